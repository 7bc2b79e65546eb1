"""Sampling parameters and the on-device distributions every decoder draws from.

AR, SD and SSD must sample from the *same* target distribution for outputs to match, so
this module defines it once: temperature, then top-k, then top-p, on float32 logits.
Per-sequence parameters are arrays, so one compiled step serves a mixed batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 0.0        # 0 = greedy
  top_k: int = 0                  # 0 = no top-k
  top_p: float = 1.0
  max_new_tokens: int = 128
  stop: tuple[str, ...] = ()      # stop strings (matched on the host, output cut before)
  seed: int | None = None         # None: a fresh seed per request (engine/sequence.py)
  ignore_eos: bool = False

  def __post_init__(self):
    # Every field is checked for its type too: a float max_new_tokens (2.5) would make the
    # device stop at 2 while the host waits for 2.5, and a NaN temperature samples garbage.
    _set = functools.partial(object.__setattr__, self)
    _set("temperature", as_float("temperature", self.temperature))
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    _set("top_k", as_int("top_k", self.top_k))
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
    _set("top_p", as_float("top_p", self.top_p))
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    _set("max_new_tokens", as_int("max_new_tokens", self.max_new_tokens))
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.seed is not None:
      _set("seed", as_int("seed", self.seed))
    if not isinstance(self.ignore_eos, (bool, np.bool_)):
      raise TypeError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
    _set("ignore_eos", bool(self.ignore_eos))
    stop = (self.stop,) if isinstance(self.stop, str) else self.stop
    if not isinstance(stop, (tuple, list)) or not all(isinstance(x, str) for x in stop):
      raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
    if any(not x for x in stop):
      raise ValueError("stop strings must be non-empty (an empty one matches at once)")
    _set("stop", tuple(stop))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def as_int(name: str, value) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
  return int(value)


def as_float(name: str, value) -> float:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
  if not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value}")
  return float(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
  """Per-sequence sampling parameters as device arrays [B]; `seed` is each row's PRNG
  seed (see `keys_at`)."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  seed: jax.Array

  @classmethod
  def from_params(cls, params: list[SamplingParams | None], batch: int,
                  seeds: list[int] | None = None) -> "SamplingArrays":
    """Rows of `params` (None: an empty row) padded to `batch`; `seeds` default to each
    params' own seed (0 where it has none)."""
    params = list(params) + [None] * (batch - len(params))
    seeds = list(seeds) if seeds is not None else [p.seed if p else 0 for p in params]
    seeds += [0] * (batch - len(seeds))
    t = [p.temperature if p else 0.0 for p in params]
    k = [p.top_k if p else 0 for p in params]
    tp = [p.top_p if p else 1.0 for p in params]
    return cls(np.asarray(t, np.float32), np.asarray(k, np.int32), np.asarray(tp, np.float32),
               np.asarray([(s or 0) & 0xFFFFFFFF for s in seeds], np.uint32))


# Every random draw a sequence makes has a key of its own, derived from the request's seed,
# what is drawn (a tag) and where (the position it decides, or a round's start position).
# So the same seed gives the same tokens whatever else shares the batch and whichever row
# it runs in, and a sequence recomputed after a preemption draws the same AR tokens again.
TAG_TOKEN = 0      # a target token sampled at a position (AR, first token)
TAG_ACCEPT = 1     # the uniforms of a verification starting at a position
TAG_RESIDUAL = 2   # the recovery token drawn at a rejection
TAG_DRAFT = 3      # a draft's K steps after the token at a position (SD, SSD miss/first)
TAG_TREE = 4       # SSD's tree of branches built for a speculation at a position


def keys_at(seeds, tag: int, counter):
  """Per-row PRNG keys [B] for draw `tag` at `counter` [B] of each row's seed [B]."""
  def one(seed, c):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), tag), c)
  return jax.vmap(one)(seeds, counter)


def fold_rows(keys, i):
  """keys [B] each folded with the same `i` (a step index; may be traced)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)


def uniform_rows(keys, n: int):
  """[B, n] uniforms in [0, 1), row b from keys[b]."""
  return jax.vmap(lambda k: jax.random.uniform(k, (n,)))(keys)


def target_probs(logits, s: SamplingArrays):
  """The distribution a sequence samples its next token from: [..., V] float32.

  Greedy rows (temperature 0) get a one-hot at the argmax, so greedy decoding is just the
  sampled case with a degenerate distribution and the same code verifies both.
  logits: [B, ..., V]; parameters broadcast over the middle axes.
  """
  logits = logits.astype(jnp.float32)
  extra = logits.ndim - 2
  expand = lambda x: x.reshape(x.shape + (1,) * (extra + 1))
  temp, top_k, top_p = expand(s.temperature), expand(s.top_k), expand(s.top_p)
  vocab = logits.shape[-1]
  greedy = temp <= 0.0
  scaled = logits / jnp.where(greedy, 1.0, temp)
  # top-k: keep tokens whose logit >= the k-th largest.
  sorted_desc = -jnp.sort(-scaled, axis=-1)
  k_idx = jnp.clip(jnp.where(top_k > 0, top_k, vocab) - 1, 0, vocab - 1)
  kth = jnp.take_along_axis(sorted_desc, k_idx, axis=-1)
  scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
  # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
  probs_sorted = jax.nn.softmax(jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf), axis=-1)
  cum_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
  keep_sorted = cum_before < top_p
  # threshold = the smallest kept logit
  thresh = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  scaled = jnp.where(scaled >= thresh, scaled, -jnp.inf)
  probs = jax.nn.softmax(scaled, axis=-1)
  onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), vocab, dtype=jnp.float32)
  return jnp.where(greedy, onehot, probs)


def sample_from(probs, keys):
  """Draw one token per distribution of probs [B, ..., V], row b with keys[b] (argmax of
  one-hot rows is exact)."""
  logp = jnp.log(jnp.maximum(probs, 0.0))
  draw = lambda key, lp: jax.random.categorical(key, lp, axis=-1)
  return jax.vmap(draw)(keys, logp).astype(jnp.int32)


def sample_tokens(logits, s: SamplingArrays, keys):
  """Sample the next token [B, ...] from target_probs; greedy rows take the argmax."""
  greedy = s.temperature <= 0.0
  greedy = greedy.reshape(greedy.shape + (1,) * (logits.ndim - 2))
  drawn = sample_from(target_probs(logits, s), keys)
  return jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)
