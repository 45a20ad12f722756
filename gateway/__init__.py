"""ModelBridge gateway: the aiohttp server and everything that does I/O.

Pure decisions live in :mod:`policies`; this package acts on them.
"""
