"""Serving layer: server setup, TLS and auth, observability, proto <-> domain conversion, the error table."""
