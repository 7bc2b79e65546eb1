"""Iteration-level scheduling: sequences join and leave the running batch between rounds.

A sequence's output does not depend on what else is in the batch: at temperature 0 it is
token for token what it is alone (float32; AR, SD and SSD with both fallbacks); sampled,
the same seed gives the same tokens. A pool too small for every request at once preempts
and recomputes, and outputs stay exact.
"""

import dataclasses

import pytest

from ssd_jax.llm import LLM
from ssd_jax.engine.sampling import SamplingParams

from engine_models import noisy_copy, scaled_target

TARGET = scaled_target(seed=0)
DRAFT = noisy_copy(TARGET, 0.6)
# More requests than rows, of mixed lengths and budgets: rows free up at different rounds.
PROMPTS = [[3, 17, 42, 8, 9], list(range(1, 30)), [77, 5], [11, 12, 13, 14, 15, 16],
           [2] * 19, [40, 41], [9, 8, 7, 6, 5, 4, 3]]
NEW = [14, 5, 21, 9, 3, 17, 11]
COMMON = dict(page_size=16, max_model_len=96)
METHODS = [("ar", {}), ("sd", {"k": 3}), ("ssd", {"k": 3, "f": 2, "fallback": "jit"}),
           ("ssd", {"k": 2, "f": 2, "fallback": "fast"})]


def _params(temperature=0.0, seed=None):
  return [SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=temperature,
                         seed=None if seed is None else seed + i) for i, n in enumerate(NEW)]


@pytest.fixture(scope="module")
def reference():
  """AR one request at a time, one step a program."""
  return LLM(TARGET, method="ar", ar_steps=1, max_batch_size=1, **COMMON)


@pytest.fixture(scope="module")
def alone(reference):
  return [reference.generate([p], q)[0].token_ids for p, q in zip(PROMPTS, _params())]


_ENGINES = {}


def _llm(method, extra):
  """One engine per configuration, shared by the tests (compiling is most of their time):
  4 rows and a pool of 8 pages of 16 tokens, too small for every request at once."""
  key = (method, tuple(sorted(extra.items())))
  if key not in _ENGINES:
    _ENGINES[key] = LLM(TARGET, DRAFT if method != "ar" else None, method=method, **extra,
                        max_batch_size=4, num_pages=8, **COMMON)
  return _ENGINES[key]


@pytest.mark.parametrize("method,extra", METHODS, ids=["ar", "sd", "ssd_jit", "ssd_fast"])
def test_joining_and_leaving_keeps_outputs_exact(method, extra, alone):
  llm = _llm(method, extra)
  outs = llm.generate(PROMPTS, _params())
  assert [o.token_ids for o in outs] == alone
  assert llm.blocks.num_free == llm.blocks.num_pages  # every page back once all finished
  if method == "ssd":
    assert llm.last_metrics["cache_hit_rate"] is not None


@pytest.mark.parametrize("method,extra", [METHODS[0], METHODS[2]], ids=["ar", "ssd"])
def test_same_seed_same_tokens_whatever_the_batch(method, extra):
  llm = _llm(method, extra)
  batch = [o.token_ids for o in llm.generate(PROMPTS, _params(0.9, seed=100))]
  # The same requests one at a time, and in reverse order (other rows, other neighbours).
  one = [llm.generate([p], q)[0].token_ids for p, q in zip(PROMPTS, _params(0.9, seed=100))]
  rev = llm.generate(PROMPTS[::-1], _params(0.9, seed=100)[::-1])
  assert batch == one == [o.token_ids for o in rev][::-1]
  other = [o.token_ids for o in llm.generate(PROMPTS, _params(0.9, seed=7))]
  assert other != batch  # (a different seed draws differently)


def test_requests_without_a_seed_draw_apart():
  llm = _llm("ar", {})
  p = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
  outs = llm.generate([PROMPTS[0]] * 4, p)
  assert len({tuple(o.token_ids) for o in outs}) > 1


# Long outputs: 4 rows that each grow to 4-5 of the pool's 8 pages.
LONG = [[3, 17, 42, 8, 9], [77, 5], [11, 12, 13, 14, 15, 16], [40, 41, 42]]


def _long(temperature=0.0):
  return [SamplingParams(max_new_tokens=60, ignore_eos=True, temperature=temperature,
                         seed=50 + i) for i in range(len(LONG))]


@pytest.fixture(scope="module")
def long_alone(reference):
  return {t: [reference.generate([p], q)[0].token_ids for p, q in zip(LONG, _long(t))]
          for t in (0.0, 0.9)}


@pytest.mark.parametrize("method,extra", METHODS[:3], ids=["ar", "sd", "ssd"])
def test_preemption_recomputes_exactly(method, extra, long_alone):
  """Running sequences outgrow the pool: the newest is preempted and recomputed from its
  prompt and output; tokens stay AR's."""
  llm = _llm(method, extra)
  outs = llm.generate(LONG, _long())
  assert [o.token_ids for o in outs] == long_alone[0.0]
  assert llm.last_metrics["preemptions"] > 0
  assert llm.blocks.num_free == llm.blocks.num_pages


def test_preempted_sampled_ar_redraws_the_same_tokens(long_alone):
  """AR draws each token with the key of its position: a recomputed sequence samples
  what it would have."""
  llm = _llm("ar", {})
  assert [o.token_ids for o in llm.generate(LONG, _long(0.9))] == long_alone[0.9]
  assert llm.last_metrics["preemptions"] > 0


def test_a_request_larger_than_the_pool_is_refused():
  llm = LLM(TARGET, method="ar", max_batch_size=2, num_pages=2, **COMMON)
  with pytest.raises(Exception, match="needs 3 KV pages"):
    llm.generate([PROMPTS[1]], dataclasses.replace(_params()[0], max_new_tokens=8))
  assert [len(o.token_ids) for o in llm.generate([PROMPTS[2]], _params()[1])] == [5]


@pytest.mark.parametrize("method,extra", METHODS[:3], ids=["ar", "sd", "ssd"])
def test_rounds_take_over_their_decode_state(method, extra, monkeypatch):
  """Every round donates the decode state it is given (its new one is written where the
  old one was, so XLA's CUDA graphs see fewer moved buffers): after a round, the state it
  read is gone. The outputs stay exact (the test above)."""
  import jax
  llm = _llm(method, extra)
  read = []
  cls = type(llm.decoding)
  orig = cls.round

  def spy(self, state, batch, obs):
    out = orig(self, state, batch, obs)
    read.append(state.decode)
    return out

  monkeypatch.setattr(cls, "round", spy)
  llm.generate(PROMPTS[:2], _params()[:2])
  assert read and all(x.is_deleted() for d in read for x in jax.tree.leaves(d))
