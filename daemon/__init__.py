"""The daemon side: models, speculative engine, worker, gRPC server, learning loop."""
