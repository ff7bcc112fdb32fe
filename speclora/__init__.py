"""SpecLoRA: a local speculative-decoding daemon whose draft learns from its rejections."""

__version__ = "0.1.0"
