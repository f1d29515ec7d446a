"""gRPC contracts (render.proto) and their generated Python modules."""
