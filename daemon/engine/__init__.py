"""Speculative decoding engine: plain generators over mlx-lm models, no gRPC."""
