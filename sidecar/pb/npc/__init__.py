"""Generated from the .proto files by sidecar/proto_gen.py (`make proto`); do not edit."""
