"""pdserve.v1 wire contract: the .proto, its generated stubs (python -m protos.generate) and gRPC helpers."""
