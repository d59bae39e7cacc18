"""Checkpoint conversion between Hugging Face and Megatron-Core (``megatron-simpo convert``)."""
