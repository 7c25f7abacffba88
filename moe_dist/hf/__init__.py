"""Hugging Face model directories: their config.json as a moe_dist config."""
