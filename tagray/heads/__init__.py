"""Tagging heads: pure PyTorch models and losses (no Ray)."""
