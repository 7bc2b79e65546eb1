"""Model definitions. They know tokens, positions and KV pages; nothing about scheduling."""

from ssd_jax.models.transformer import AttentionInputs, KVCache, TreeScratch, Transformer

__all__ = ["AttentionInputs", "KVCache", "TreeScratch", "Transformer"]
