"""The proxy: the lean front, the aiohttp handlers, streaming, the model catalog, the key cache,
tokens."""
