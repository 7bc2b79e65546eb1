"""Temperature > 0: SD and SSD (with and without cache-aware sampling) sample the first
tokens from exactly AR's distribution (chi-square goodness of fit against the target's
exact joint distribution of the first two generated tokens, small vocabulary)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax.llm import LLM
from ssd_jax.engine.sampling import SamplingArrays, SamplingParams, target_probs
from ssd_jax.models.transformer import AttentionInputs, init_kv_cache

from engine_models import noisy_copy, tiny_target

VOCAB = 8
PROMPT = [1, 5, 2, 7]
TEMP = 1.0
BATCH = 64
CALLS = 24  # generate calls of BATCH requests: 1536 samples per method


def _chi2_critical(df, z=3.29):
  """Upper quantile of chi-square (Wilson-Hilferty); z=3.29 is p ~ 0.0005 one-sided."""
  return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _exact_joint(model, params):
  """P(t1, t2 | PROMPT) under the target's sampling distribution (AR by definition)."""
  cfg = model.cfg
  s = SamplingArrays.from_params([params] * VOCAB, VOCAB)
  s = jax.tree.map(jnp.asarray, s)
  kv = init_kv_cache(cfg, 8, 16, jnp.float32)
  seq = np.array([PROMPT + [t] for t in range(VOCAB)], np.int32)  # [V, L+1]
  pos = np.tile(np.arange(seq.shape[1], dtype=np.int32), (VOCAB, 1))
  pages = np.zeros((VOCAB, 1), np.int32)
  # Each row in its own page so rows do not overwrite each other.
  pages[:, 0] = np.arange(VOCAB)
  slots = pages[:, :1] * 16 + pos
  attn = AttentionInputs(page_table=jnp.asarray(pages), slot_mapping=jnp.asarray(slots),
                         kv_limit=jnp.asarray(pos + 1))
  logits, _, _ = model(jnp.asarray(seq), jnp.asarray(pos), kv, attn)
  p = np.asarray(target_probs(logits, s))  # [V, L+1, V]
  p1 = p[0, len(PROMPT) - 1]               # after the prompt
  p2 = p[:, len(PROMPT)]                   # after prompt + t1 (row t1)
  return p1[:, None] * p2


def _samples(llm, params, seed_base=0):
  pairs = []
  for w in range(CALLS):  # every request with a seed of its own
    ps = [SamplingParams(temperature=params.temperature, top_k=params.top_k,
                         top_p=params.top_p, max_new_tokens=2, ignore_eos=True,
                         seed=seed_base + 1000 * w + i) for i in range(BATCH)]
    for o in llm.generate([PROMPT] * BATCH, ps):
      pairs.append(tuple(o.token_ids[:2]))
  counts = np.zeros((VOCAB, VOCAB))
  for a, b in pairs:
    counts[a, b] += 1
  return counts


TARGET = tiny_target(seed=3, vocab=VOCAB)
TARGET.norm.weight[...] = TARGET.norm.weight[...] * 6.0  # a non-flat distribution
DRAFT = noisy_copy(TARGET, 0.8, seed=5)
COMMON = dict(page_size=16, max_model_len=64, max_batch_size=BATCH)


def _chi2_stat(counts, expected):
  """(statistic, degrees of freedom) of counts against expected ones."""
  mask = expected > 5  # pool rare cells (the usual validity rule for chi-square)
  obs = np.append(counts[mask], counts[~mask].sum())
  exp = np.append(expected[mask], expected[~mask].sum())
  if exp[-1] == 0:
    assert obs[-1] == 0, "a token with zero probability under AR was sampled"
    obs, exp = obs[:-1], exp[:-1]
  return float(np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-12))), len(obs) - 1


@pytest.mark.parametrize("method,extra", [
    ("ar", {}),
    ("sd", {"k": 3}),
    ("ssd", {"k": 3, "f": 2, "fallback": "jit"}),
    ("ssd", {"k": 2, "f": 2, "fallback": "fast", "sampler_x": 0.3}),
    ("sd", {"k": 2, "draft_temperature": 0.5}),
])
@pytest.mark.parametrize("params", [SamplingParams(temperature=TEMP),
                                    SamplingParams(temperature=0.8, top_k=5, top_p=0.9)],
                         ids=["plain", "topk_topp"])
def test_distribution_matches_ar(method, extra, params):
  """Two-stage: a sample whose statistic lands past the p ~ 0.0005 quantile is drawn again
  with other seeds, and the test fails only if that one does too. A sampler that is off
  fails both; a correct one now fails in ~1 of 4 million runs instead of 1 in 2,000 per
  case (the seeds are fixed, so a model whose fixed draw happens to sit in the tail would
  otherwise fail for ever: the AR case's first draw did, at 101.9 against 100.2, df 58,
  once the random test model's weights were redrawn; three other seed sets gave 60-66)."""
  draft = DRAFT if method != "ar" else None
  llm = LLM(TARGET, draft, method=method, **extra, **COMMON)
  exact = _exact_joint(TARGET, params)
  stats = []
  for seed_base in (0, 10 ** 6):
    counts = _samples(llm, params, seed_base)
    stat, df = _chi2_stat(counts, exact * counts.sum())
    stats.append(stat)
    if stat < _chi2_critical(df):
      break
  assert stats[-1] < _chi2_critical(df), (method, extra, stats, df)
