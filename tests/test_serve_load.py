"""Issue 15's serving benchmark (bench/serve_load.py): its statistics against hand-computed
values, its SSE parsing against canned streams, and the whole command against a server it
launches itself (a tiny random checkpoint without a tokenizer, as the random-weight GPU
checkpoints are; SD with the target as its own draft, so every draft token is accepted),
whose JSON, PNG and server-counter deltas must agree with what the client saw. SD, not
SSD, and a batch of 1 (requests queue in the server) keep its compiling, most of the
~40 s, short."""

import asyncio
import json
import math
import os
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from bench import serve_stats
from bench.serve_stats import RequestResult

from helpers import make_tiny_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requests():
  return [
      # ttft .1, e2e .6, tpot (.6-.1)/3, itls .2 .3
      RequestResult(True, 10, t_send=0.0, t_end=0.6, chunk_times=[0.1, 0.3, 0.6],
                    output_tokens=4),
      # ttft .2, e2e .4, tpot .2/1, itl .1
      RequestResult(True, 10, t_send=0.5, t_end=0.9, chunk_times=[0.7, 0.8], output_tokens=2),
      RequestResult(False, 10, t_send=0.6, t_end=0.7, error="boom"),
      # one token: a TTFT and an E2E, no TPOT, no ITL
      RequestResult(True, 10, t_send=1.0, t_end=1.5, chunk_times=[1.4], output_tokens=1),
  ]


def test_summarize_hand_computed():
  s = serve_stats.summarize(_requests(), duration_s=2.0)
  assert (s["completed"], s["failed"], s["errors"]) == (3, 1, ["boom"])
  assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 7)
  assert s["request_throughput"] == pytest.approx(1.5)
  assert s["output_throughput"] == pytest.approx(3.5)
  assert s["total_token_throughput"] == pytest.approx(18.5)
  assert s["tokens_per_chunk"] == pytest.approx(7 / 6)
  want = {  # ms: mean, median, std (population), p99 (linear between the two largest)
      "ttft_ms": (700 / 3, 200, math.sqrt(15555.5556), 200 + 0.98 * 200),
      "tpot_ms": (550 / 3, 550 / 3, 50 / 3, 500 / 3 + 0.99 * 100 / 3),
      "itl_ms": (200, 200, math.sqrt(20000 / 3), 200 + 0.98 * 100),
      "e2el_ms": (500, 500, math.sqrt(20000 / 3), 500 + 0.98 * 100),
  }
  for key, (mean, median, std, p99) in want.items():
    d = s[key]
    assert (d["mean"], d["median"], d["std"], d["p99"]) == pytest.approx(
        (mean, median, std, p99), rel=1e-6), key
  assert (s["ttft_ms"]["n"], s["tpot_ms"]["n"], s["itl_ms"]["n"]) == (3, 2, 3)


def test_empty_run_has_no_nan():
  s = serve_stats.summarize([RequestResult(False, 5, 0.0, 1.0, error="x")], 1.0)
  assert s["ttft_ms"] == {"mean": None, "median": None, "std": None, "p99": None, "n": 0}
  assert s["tokens_per_chunk"] is None
  json.dumps(s, allow_nan=False)


def test_arrival_offsets():
  assert serve_stats.arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
  a = serve_stats.arrival_offsets(4000, 20.0, 1)
  assert a == serve_stats.arrival_offsets(4000, 20.0, 1) and a[0] == 0.0
  gaps = [y - x for x, y in zip(a, a[1:])]
  assert min(gaps) >= 0 and sum(gaps) / len(gaps) == pytest.approx(0.05, rel=0.08)
  with pytest.raises(ValueError):
    serve_stats.arrival_offsets(2, 0.0, 0)


METRICS_BEFORE = """# HELP ssd_jax_decode_rounds_total Decode rounds.
# TYPE ssd_jax_decode_rounds_total counter
ssd_jax_decode_rounds_total 10.0
ssd_jax_decode_rounds_created 1.7e9
ssd_jax_accepted_draft_tokens_total 15.0
ssd_jax_ssd_cache_lookups_total 8.0
ssd_jax_ssd_cache_hits_total 2.0
ssd_jax_requests_finished_total{reason="length"} 3.0
ssd_jax_generation_tokens_total 40.0
other_metric_total 99.0
"""
METRICS_AFTER = METRICS_BEFORE.replace("rounds_total 10.0", "rounds_total 30.0").replace(
    "tokens_total 15.0", "tokens_total 55.0").replace("lookups_total 8.0", "lookups_total 18.0"
    ).replace("hits_total 2.0", "hits_total 9.0").replace("generation_tokens_total 40.0",
                                                         "generation_tokens_total 100.0")


def test_server_counters():
  before = serve_stats.parse_prometheus(METRICS_BEFORE)
  assert before == {"decode_rounds": 10.0, "accepted_draft_tokens": 15.0,
                    "ssd_cache_lookups": 8.0, "ssd_cache_hits": 2.0, "generation_tokens": 40.0}
  d = serve_stats.server_deltas(before, serve_stats.parse_prometheus(METRICS_AFTER))
  assert d["mean_accepted"] == pytest.approx(40 / 20)
  assert d["cache_hit_rate"] == pytest.approx(7 / 10)
  assert d["deltas"]["generation_tokens"] == 60.0
  ar = serve_stats.server_deltas(before, before)  # nothing moved: no ratio, not 0/0
  assert (ar["mean_accepted"], ar["cache_hit_rate"]) == (None, None)
  assert serve_stats.server_deltas(None, before) is None
  assert serve_stats.server_deltas(before, before, speculative=False)["mean_accepted"] is None


def _sse(*objs, done=True) -> bytes:
  out = "".join(f"data: {json.dumps(o)}\n\n" for o in objs)
  return (out + ("data: [DONE]\n\n" if done else "")).encode()


def _send(content: bytes, status: int = 200, chat: bool = False):
  from bench.serve_load import send
  transport = httpx.MockTransport(lambda req: httpx.Response(status, content=content))

  async def go():
    async with httpx.AsyncClient(transport=transport) as client:
      return await send(client, "http://x/v1/completions", {"prompt": [5, 6, 7]}, chat)
  return asyncio.run(go())


def test_send_parses_the_stream():
  text = lambda t, fin=None: {"choices": [{"text": t, "finish_reason": fin}]}  # noqa: E731
  usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}
  r = _send(_sse(text("17 18"), text(""), text(" 19 20 21", "length"), usage))
  assert r.ok and (r.output_tokens, r.prompt_len, r.finish_reason) == (5, 3, "length")
  assert len(r.chunk_times) == 2  # the empty chunk is no token's arrival
  assert r.t_send <= r.chunk_times[0] <= r.chunk_times[1] <= r.t_end
  chat = _send(_sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                    {"choices": [{"delta": {"content": "hi"}}]}, usage), chat=True)
  assert chat.ok and len(chat.chunk_times) == 1  # the role chunk carries no text
  cut = _send(_sse(text("1"), done=False))
  assert not cut.ok and "[DONE]" in cut.error
  assert "usage" in _send(_sse(text("1"))).error
  bad = _send(b'{"error": {"message": "max_tokens is too large"}}', status=400)
  assert not bad.ok and bad.error == "HTTP 400: max_tokens is too large"
  err = _send(_sse({"error": {"message": "generation failed"}}))
  assert not err.ok and "generation failed" in err.error


def test_bad_launch_flags_fail_before_starting(tmp_path):
  r = subprocess.run([sys.executable, "bench/serve_load.py", "--launch", "--port 9",
                      "--vocab_size", "96"], cwd=ROOT, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
      "serve_load: error: --launch: leave out --port; the load generator picks it")


def test_launch_measure_stop(tmp_path):
  """One command: launch SD on a tiny random checkpoint (its shapes compiled before it
  serves), two rates (at most 3 requests in flight), stop it; then the plot of two runs."""
  ckpt = make_tiny_hf_checkpoint(tmp_path, "llama", tokenizer=False)
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # the server needs one CPU device, not the tests' eight
  launch = (f"--method sd --model {ckpt} --draft {ckpt} --k 3 --max_model_len 64 "
            "--page_size 16 --batch_size 1 --warmup_prompt_len 12 "
            "--warmup_max_tokens 8")
  cmd = [sys.executable, "bench/serve_load.py", "--launch", launch, "--dataset", "random",
         "--input_len", "12", "--output_len", "8", "--num_prompts", "6",
         "--request_rates", "inf,20", "--max_concurrency", "3", "--warmup_ladder", "1,2",
         "--label", "sd-tiny", "--output_json", str(out / "sd.json"),
         "--plot", str(out / "sd.png")]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  rep = json.loads((out / "sd.json").read_text())
  assert rep["partial"] is False and rep["label"] == "sd-tiny" and not rep["errors"]
  assert rep["workload"]["vocab_size"] == 96  # read from the checkpoint's config.json
  assert rep["server"]["launched"]["exit_code"] == 0  # SIGTERM: a clean stop
  assert rep["warmup"]["failed"] == 0 and rep["warmup"]["ladder"] == [1, 2]
  assert [run["request_rate"] for run in rep["runs"]] == ["inf", 20.0]
  for run in rep["runs"]:
    assert (run["completed"], run["failed"], run["max_concurrency"]) == (6, 0, 3)
    assert run["total_output_tokens"] == 6 * 8 and run["total_input_tokens"] == 6 * 12
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
      assert set(run[key]) == {"mean", "median", "std", "p99", "n"}
      assert 0 < run[key]["median"] <= run[key]["p99"]
    assert run["ttft_ms"]["median"] <= run["e2el_ms"]["median"]
    assert run["output_throughput"] == pytest.approx(48 / run["duration_s"])
    srv = run["server"]
    # The server counted exactly this run's requests (the deltas bracket it)...
    assert srv["deltas"]["generation_tokens"] == 48 and srv["deltas"]["prompt_tokens"] == 72
    # ...and the target drafting for itself accepts every draft token (K=3 per round).
    assert srv["mean_accepted"] == pytest.approx(3.0)
    assert srv["cache_hit_rate"] is None  # SD looks nothing up
    assert len(run["requests"]) == 6 and all(q["ok"] for q in run["requests"])
  assert (out / "sd.png").read_bytes()[:4] == b"\x89PNG"
  assert (out / "sd_server.log").stat().st_size > 0
  rep["label"] = "other"
  (out / "other.json").write_text(json.dumps(rep))
  p = subprocess.run([sys.executable, "bench/serve_plot.py", "--inputs",
                      f"{out / 'sd.json'},{out / 'other.json'}", "--out",
                      str(out / "both.png"), "--table"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  assert p.stdout.count("sd-tiny") == 2 and p.stdout.count("other") == 2
  assert (out / "both.png").read_bytes()[:4] == b"\x89PNG"
