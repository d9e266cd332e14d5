"""The gRPC edge: protobuf <-> dialogue types, status codes, auth, logs. Nothing here knows about tensors."""
