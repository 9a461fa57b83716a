"""Generated protobuf and gRPC modules of the `embedwarden.v1` contract (see proto/generate.py)."""
