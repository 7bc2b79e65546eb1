"""Offline prompt sets for benchmarks (see prompts.py for where each comes from)."""

from ssd_jax.data.prompts import (DATASETS, DatasetUnavailable, PromptSet, available, load,
                                  synthetic_token_ids)

__all__ = ["DATASETS", "DatasetUnavailable", "PromptSet", "available", "load",
           "synthetic_token_ids"]
