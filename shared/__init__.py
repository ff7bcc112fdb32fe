"""Shared by daemon and client: config, paths, logging, generated gRPC stubs."""
