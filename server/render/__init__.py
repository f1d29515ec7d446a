"""The render node: gRPC service, job store, backend registry."""
