"""Exactness at temperature 0: SD and SSD commit exactly AR's tokens (float32).

Covers K in {1, 3, 7}, F in {1, 3}, uneven fan-out lists, both fallbacks, batch 1 and 4
with ragged prompts, a draft that is not the target, one that is (long acceptances, cache
hits) and a noisy copy (hits and misses), a 2-way TP target with the draft on its own
device, and stops (EOS inside an accepted speculation, max_new_tokens).
"""

import jax
import pytest

from ssd_jax.llm import LLM
from ssd_jax.engine.sampling import SamplingParams

from engine_models import noisy_copy, scaled_target, tiny_target

PROMPTS = [[3, 17, 42, 8, 9], list(range(1, 30)), [77, 5], [11, 12, 13, 14, 15, 16, 17, 18]]
MAX_NEW = 24

TARGET = scaled_target(seed=0)
DRAFTS = {
    "other": tiny_target(seed=7, layers=1),
    "self": TARGET,
    "noisy": noisy_copy(TARGET, 0.6),
}
COMMON = dict(page_size=16, max_model_len=128, max_batch_size=4)


def _generate(llm, prompts, max_new=MAX_NEW, ignore_eos=True):
  outs = llm.generate(prompts, SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos))
  return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def ar_tokens():
  llm = LLM(TARGET, method="ar", ar_steps=1, **COMMON)  # the reference: one step a program
  return {"batch": _generate(llm, PROMPTS),
          "single": [_generate(llm, [p])[0] for p in PROMPTS[:2]]}


def _check(llm, ar_tokens):
  assert _generate(llm, PROMPTS) == ar_tokens["batch"]
  assert [_generate(llm, [p])[0] for p in PROMPTS[:2]] == ar_tokens["single"]
  return llm.last_metrics


@pytest.mark.parametrize("k,draft", [(1, "other"), (3, "noisy"), (7, "self")])
def test_sd_equals_ar(ar_tokens, k, draft):
  llm = LLM(TARGET, DRAFTS[draft], method="sd", k=k, **COMMON)
  m = _check(llm, ar_tokens)
  if draft == "self":
    assert m["mean_accepted"] > k - 1  # the target drafting for itself is always right


SSD_CASES = [
    # k, f, fanout_hit, fanout_miss, fallback, draft
    (1, 1, None, None, "jit", "other"),
    (3, 3, None, None, "jit", "noisy"),
    (3, 3, None, None, "fast", "noisy"),
    (3, 1, "3,1,0,0", "1,1,1,1", "jit", "noisy"),
    (7, 3, None, None, "fast", "self"),
    (7, 1, None, None, "jit", "noisy"),
]


@pytest.mark.parametrize("k,f,fan_hit,fan_miss,fallback,draft", SSD_CASES)
def test_ssd_equals_ar(ar_tokens, k, f, fan_hit, fan_miss, fallback, draft):
  llm = LLM(TARGET, DRAFTS[draft], method="ssd", k=k, f=f, fanout_hit=fan_hit,
            fanout_miss=fan_miss, fallback=fallback, **COMMON)
  m = _check(llm, ar_tokens)
  assert m["cache_hit_rate"] is not None
  if draft == "self":
    assert m["cache_hit_rate"] == 1.0


def test_ssd_sees_hits_and_misses(ar_tokens):
  """The noisy draft must produce both cache hits and misses, or the cache logic is
  untested by the exactness cases above."""
  llm = LLM(TARGET, DRAFTS["noisy"], method="ssd", k=3, f=3, fallback="jit", **COMMON)
  outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
  assert [o.token_ids for o in outs] == ar_tokens["batch"]
  hits = llm.last_metrics["cache_hit_rate"]
  assert 0.0 < hits < 1.0, hits
  assert 0.0 < llm.last_metrics["mean_accepted"] < 3.0


# A 2x1 target mesh plus a draft device: 3 devices (CPU runs have 8 virtual ones; a
# one-GPU machine has 1).
needs_3_devices = pytest.mark.skipif(len(jax.devices()) < 3, reason="needs 3 devices")


@needs_3_devices
def test_ssd_tensor_parallel_target_with_separate_draft_device(ar_tokens):
  llm = LLM(TARGET, DRAFTS["noisy"], method="ssd", k=3, f=2, mesh="2x1", draft_devices=1,
            **COMMON)
  assert llm.draft.mesh.devices.size == 1
  assert set(llm.draft.mesh.devices.flat).isdisjoint(set(llm.target.mesh.devices.flat))
  _check(llm, ar_tokens)


@needs_3_devices
def test_sd_tensor_parallel_with_separate_draft_device(ar_tokens):
  llm = LLM(TARGET, DRAFTS["noisy"], method="sd", k=3, mesh="2x1", draft_devices=1, **COMMON)
  _check(llm, ar_tokens)


def test_warmup_covers_prefill_after_a_cached_prefix():
  """How much a prompt prefills depends on the prefix cache: only the suffix after its
  cached pages, or all of it. A warm-up that itself hit the cache prefilled a suffix only;
  warmup() compiles every token bucket up to the whole prompt's, so nothing compiles later."""
  llm = LLM(TARGET, DRAFTS["noisy"], method="sd", k=3, **COMMON)
  llm.warmup(1, 40, max_new_tokens=16)
  llm.warmup(1, 60, max_new_tokens=16)  # its first 32 tokens are the first warm-up's: cached
  base = [(i * 5 + 3) % 90 + 1 for i in range(60)]
  # nothing cached; 2 pages cached (32-token suffix); 3 pages cached (2-token suffix)
  for prompt in (base, base[:40] + [7] * 20, base[:50]):
    llm.generate([prompt], SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert llm.last_metrics["compilations"] == 0, len(prompt)


def test_no_recompilation_after_warmup():
  """Once a run's shapes are compiled (batch sizes and their changes, prompt buckets,
  pages), new requests through the same shapes compile nothing, whatever their tokens.
  (That every shape of a long-lived engine can be compiled up front, so that arbitrary
  traffic compiles nothing, is test_bad_input's warmup(all_buckets=True) tests.)"""
  llm = LLM(TARGET, DRAFTS["self"], method="ssd", k=3, f=2, **COMMON)
  llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
  assert llm.last_metrics["compilations"] > 0
  other = [[(t * 7 + 3) % 90 for t in p] for p in PROMPTS]
  other[2] = other[2] + [4, 4, 4]
  llm.generate(other, SamplingParams(max_new_tokens=12, ignore_eos=True))
  assert llm.last_metrics["compilations"] == 0
  # Profile mode times every round and splits them by cache hit / miss, same programs.
  llm.profile = True
  llm.reset_prefix_cache()
  llm.generate(other, SamplingParams(max_new_tokens=12, ignore_eos=True))
  m = llm.last_metrics
  assert m["compilations"] == 0 and m["profiled_round_ms"] > 0
  assert "hit_round_ms" in m or "miss_round_ms" in m
  # Host tracing times each dispatch of a round; it adds no program and no sync.
  llm.profile, llm.trace_host = False, True
  llm.reset_prefix_cache()
  outs = llm.generate(other, SamplingParams(max_new_tokens=12, ignore_eos=True))
  m = llm.last_metrics
  assert m["compilations"] == 0 and "profiled_round_ms" not in m
  assert {"host_lookup_ms", "host_verify_ms", "host_build_ms", "host_drain_ms"} <= set(m)
  llm.trace_host = False


def test_command_buffer_modes_are_compile_options():
  """XLA command-buffer modes are per-program compiler options (GPU only; ignored on
  CPU): the outputs stay AR's, and an unknown mode is refused at once."""
  ref = _generate(LLM(TARGET, method="ar", **COMMON), PROMPTS[:1], max_new=6)
  llm = LLM(TARGET, DRAFTS["noisy"], method="ssd", k=3, f=2, command_buffers="max",
            **COMMON)
  assert llm.draft.compiler_options["xla_gpu_enable_command_buffer"].endswith("CONDITIONAL")
  assert _generate(llm, PROMPTS[:1], max_new=6) == ref
  with pytest.raises(ValueError, match="command_buffers"):
    LLM(TARGET, method="ar", command_buffers="all", **COMMON)


def test_ssd_lookup_fallback_is_a_device_side_loop():
  """XLA:GPU waits on the host for a conditional's predicate unless it can put it in a CUDA
  graph, which it never does for a conditional around a loop: the jit fallback is one
  loop of 0 or K trips (no conditional), compiled with loops in graphs unless graphs are
  off. The draft's side runs on its own host thread; outputs stay AR's."""
  llm = LLM(TARGET, DRAFTS["noisy"], method="ssd", k=3, f=2, **COMMON)
  dec = llm.decoding
  assert dec.lookup_compiler_options["xla_gpu_enable_command_buffer"].endswith("CONDITIONAL")
  calls = []
  lookup = dec._lookup
  dec._lookup = lambda *a, **kw: calls.append((a, kw)) or lookup(*a, **kw)
  ref = _generate(LLM(TARGET, method="ar", **COMMON), PROMPTS[:1], max_new=8)
  assert _generate(llm, PROMPTS[:1], max_new=8) == ref
  assert dec._job is None  # finish() ran: no draft work outlives the wave
  args, kw = calls[0]
  # Lowered for GPU: on CPU, jax lowers its random-bits hash with a loop of its own.
  text = lookup.trace(*args, **kw).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.while" in text
  assert "stablehlo.case" not in text and "stablehlo.if" not in text
  off = LLM(TARGET, DRAFTS["noisy"], method="ssd", k=3, f=2, command_buffers="off", **COMMON)
  assert off.decoding.lookup_compiler_options == off.draft.compiler_options


def test_ssd_draft_thread_error_reaches_the_caller():
  """An error in the draft thread's job is raised in the caller's thread, once; the next
  generate works."""
  llm = LLM(TARGET, DRAFTS["noisy"], method="ssd", k=3, f=2, **COMMON)
  dec = llm.decoding
  build = dec._build
  dec._build = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("draft side broke"))
  with pytest.raises(RuntimeError, match="draft side broke"):
    _generate(llm, PROMPTS[:1], max_new=8)
  dec._build = build
  ref = _generate(LLM(TARGET, method="ar", **COMMON), PROMPTS[:1], max_new=8)
  assert _generate(llm, PROMPTS[:1], max_new=8) == ref


@pytest.mark.parametrize("method", ["ar", "sd", "ssd"])
def test_eos_inside_speculation_and_max_new_tokens(method):
  """Outputs stop at EOS (kept as the last token) and never exceed max_new_tokens."""
  ar = LLM(TARGET, method="ar", **COMMON)
  ref = _generate(ar, PROMPTS, max_new=40)
  # Pick a token the target actually produces mid-sequence and declare it EOS.
  stop_tok = ref[1][5]
  kw = dict(COMMON)
  if method != "ar":
    kw.update(method=method, k=7)
  draft = TARGET if method != "ar" else None  # accepts everything: EOS lands mid-speculation
  llm = LLM(TARGET, draft, **kw) if draft is not None else LLM(TARGET, method="ar", **kw)
  llm.eos_ids = llm.decoding.eos_ids = (stop_tok,)
  outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=40))
  for r, o in zip(ref, outs):
    expect = r[:r.index(stop_tok) + 1] if stop_tok in r else r
    assert o.token_ids == expect
    assert len(o.token_ids) <= 40
  assert outs[1].finish_reason == "stop"
  short = llm.generate(PROMPTS, SamplingParams(max_new_tokens=3, ignore_eos=True))
  assert all(len(o.token_ids) == 3 for o in short)
  assert [o.token_ids for o in short] == [r[:3] for r in _generate(ar, PROMPTS, 3)]


@pytest.mark.parametrize("method", ["ar", "sd", "ssd"])
def test_steps_padded_to_min_rows_are_exact(ar_tokens, method):
  """GPU runners pad steps of fewer tokens to 8 rows (single-row GEMMs are slow there):
  the padded rows write no KV and change no output, at batch 1 and batch 4."""
  kw = dict(COMMON, min_step_rows=8)
  if method == "ar":
    llm = LLM(TARGET, method="ar", **kw)
  else:
    llm = LLM(TARGET, DRAFTS["noisy"], method=method, k=3, f=2, **kw)
  assert llm.target.min_rows == 8
  assert _generate(llm, PROMPTS[:1]) == ar_tokens["single"][:1]
  assert _generate(llm, PROMPTS) == ar_tokens["batch"]


def test_ar_rounds_of_several_steps_are_exact(ar_tokens):
  """AR rounds of several steps in one program emit exactly the one-step tokens, stops
  included (max_new_tokens not a multiple of the steps; EOS mid-round)."""
  llm = LLM(TARGET, method="ar", ar_steps=4, **COMMON)
  assert _generate(llm, PROMPTS) == ar_tokens["batch"]
  short = llm.generate(PROMPTS, SamplingParams(max_new_tokens=7, ignore_eos=True))
  assert [o.token_ids for o in short] == [r[:7] for r in ar_tokens["batch"]]
  stop_tok = ar_tokens["batch"][1][5]
  llm.eos_ids = llm.decoding.eos_ids = (stop_tok,)
  outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
  for r, o in zip(ar_tokens["batch"], outs):
    assert o.token_ids == (r[:r.index(stop_tok) + 1] if stop_tok in r else r)
  with pytest.raises(ValueError, match="ar_steps must be >= 1"):
    LLM(TARGET, method="ar", ar_steps=0, **COMMON)


def test_fused_products_keep_sd_and_ssd_exact():
  """With the layers' products fused (`matmul_impl="pallas"`; interpret mode on CPU), SD
  and SSD still commit exactly AR's tokens, AR with the same kernels being the reference
  (steps padded to 8 rows as on the GPU)."""
  kw = dict(COMMON, min_step_rows=8, matmul_impl="pallas")
  try:
    ar = _generate(LLM(TARGET, method="ar", **kw), PROMPTS)
    for method, extra in (("sd", {}), ("ssd", dict(f=2, fallback="fast"))):
      llm = LLM(TARGET, DRAFTS["noisy"], method=method, k=3, **extra, **kw)
      assert _generate(llm, PROMPTS) == ar, method
  finally:
    TARGET.set_matmul_impl("xla")
    DRAFTS["noisy"].set_matmul_impl("xla")
