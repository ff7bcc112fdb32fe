"""The learning loop: failure store, LoRA trainer, adapter versions."""
