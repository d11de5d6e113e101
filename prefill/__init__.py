"""Prefill worker: chunked prefill with prefix caching, pushing each layer's KV to the decode worker."""
