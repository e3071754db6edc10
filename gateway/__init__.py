"""sandbox-gateway: one Docker container per user, behind one aiohttp service."""
