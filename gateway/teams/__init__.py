"""Team domain code: billing, alerts, mail. No aiohttp.web here."""
