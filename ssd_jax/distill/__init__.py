"""Draft distillation: train a small draft for any target, offline.

  corpus      offline text (stdlib + installed packages), streamed; HumanEval held out
  draft_init  the draft's architecture from its target; init from the target's first layers
  train       KL(target || draft) training with optax + orbax resume; acceptance estimate
  __main__    `python -m ssd_jax.distill` (see bench/DISTILL.md for the default draft's recipe)

`ensure_default_draft()` returns the default draft of the embedded SmolLM2-135M-Instruct
as a HuggingFace dir (built in the cache on first use from drafts/ + the target's embedding).
"""


def ensure_default_draft(*args, **kwargs) -> str:
  from ssd_jax.distill.draft_init import ensure_default_draft as f
  return f(*args, **kwargs)


__all__ = ["ensure_default_draft"]
