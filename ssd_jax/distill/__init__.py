"""Draft distillation: train a small draft for any target, offline.

  corpus      offline text (stdlib + installed packages), streamed; HumanEval held out
  draft_init  the draft's architecture from its target; init from the target's first layers
  train       KL(target || draft) training with optax + orbax resume; acceptance estimate
  __main__    `python -m ssd_jax.distill` (see bench/DISTILL.md for the default draft's recipe)

The inference path never imports this package: the bundled draft it trains is read by
ssd_jax.checkpoint.default_draft.
"""
