"""ModelBridge's own benchmark: what the gateway adds on top of its upstream (``make bench``).

``python -m bench.run --help`` for the options; see :mod:`bench.run` for what is measured.
"""
