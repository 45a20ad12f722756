"""Pure decisions of ModelBridge: no I/O, no clock, no await.

Everything here takes its inputs (the time included) as arguments and returns a value, so it is
tested with tables. The Lua scripts in ``lua/`` run the same decisions atomically in Redis; the
parity tests feed both the same tables.
"""
