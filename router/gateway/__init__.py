"""OpenAI-compatible HTTP in front of the router's public gRPC API (``pdserve gateway``).

Stack: **aiohttp**. One dependency gives an async HTTP/1.1 server with streaming responses (Server-Sent
Events are plain chunked writes), a request parser in C (llhttp), and handler cancellation when a client
disconnects, which is what lets a dropped client cancel its gRPC stream at once, so the decode worker
frees its KV blocks. It runs on the same asyncio (uvloop) loop as grpc.aio, with no ASGI adapter layer in
between: the gateway's whole job is a thin, low-overhead translation (``bench/gateway_overhead.py`` measures
what it adds over calling the router's gRPC directly). No HTTP is parsed by hand.

The gateway talks to the router only through its public gRPC API (``Generation.Generate / Complete /
Models`` and grpc health) and never imports torch: it is a proto and JSON translator.

- ``openai_request``: an OpenAI request body -> one ``GenerateRequest`` per choice, or a 400 naming the field.
- ``openai_response``: router responses -> OpenAI completion / chat objects and stream chunks.
- ``errors``: gRPC status -> HTTP status and OpenAI's error JSON.
- ``app``: the aiohttp handlers; ``server``: the process (config, bind, SIGTERM).
"""
