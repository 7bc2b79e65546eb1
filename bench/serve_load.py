r"""A load generator for the OpenAI-compatible server (`python -m ssd_jax.serve`), in the
convention of `vllm bench serve` / sglang `bench_serving`: Poisson arrivals at each of
--request_rates (inf: all at once), optionally capped at --max_concurrency requests in
flight, streamed /v1/completions (or chat) requests; per rate the request and output
token throughput, TTFT / TPOT / ITL / E2E latency (mean, median, p99; bench/serve_stats.py
defines them) and, from GET /metrics before and after, the server's SD/SSD mean accepted
draft tokens per round and SSD cache hit rate. JSON per run (--output_json), PNG of
latency against throughput (--plot; bench/serve_plot.py draws several runs together).

  # against a running server
  PYTHONPATH=$PWD python bench/serve_load.py --base_url http://127.0.0.1:8000 \
      --dataset prose --num_prompts 32 --request_rates 1,4,inf --output_json out/sd.json
  # one command per method: start the server, measure, stop it (SIGTERM)
  PYTHONPATH=$PWD python bench/serve_load.py --launch "--method sd --model /ckpt/t \
      --draft /ckpt/d --k 7 --dtype bfloat16" --dataset random --input_len 128 \
      --output_len 128 --request_rates 1,4,16 --output_json out/sd.json --plot out/sd.png

Before the timed rates, a warm-up ladder (--warmup_ladder 1,2,4,8: that many requests at
once, one burst after the other) makes the server compile the batch shapes the load will
use, so that no rate times a compilation. Exit codes: 0 every request completed, 1 some
failed, 2 usage or setup error (a server that would not start too), 128+signal when
interrupted (the JSON then holds the rates done, with "partial": true).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import shlex
import signal
import sys
import time

if __package__ in (None, ""):  # `python bench/serve_load.py`: the repository on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import serve_stats
from bench.errors import BenchError
from bench.serve_launch import LaunchedServer, flag_value, model_vocab_size

RANDOM_LABEL = "random-weight timing"  # as bench/report.py (not imported: it pulls in more)
_RESERVED_IDS = 16  # random ids stay above the ids where special tokens usually live


def define_flags(flag_values=None):
  from absl import flags
  fv = flag_values if flag_values is not None else flags.FLAGS
  d = dict(flag_values=fv)
  flags.DEFINE_string("base_url", "http://127.0.0.1:8000", "the server (ignored with "
                      "--launch)", **d)
  flags.DEFINE_string("launch", None, "start `python -m ssd_jax.serve` with these flags "
                      "(quoted; no --host/--port), measure, then stop it", **d)
  flags.DEFINE_float("launch_timeout_s", 900, "how long the launched server may take to "
                     "answer GET /health (loading, warm-up)", **d)
  flags.DEFINE_string("server_log", None, "the launched server's log (default: beside "
                      "--output_json, else /tmp)", **d)
  flags.DEFINE_string("model", None, "model name to send (default: GET /v1/models)", **d)
  flags.DEFINE_enum("endpoint", "completions", ["completions", "chat"], "API", **d)
  flags.DEFINE_string("dataset", "random", "random (token ids of --input_len) or an "
                      "offline prompt set: humaneval, alpaca_like, prose", **d)
  flags.DEFINE_integer("input_len", None, "prompt length in token ids (random: required, "
                       "default 128; a prompt set: its text made exactly this many ids)", **d)
  flags.DEFINE_string("tokenizer", None, "HF tokenizer dir for --input_len with a prompt "
                      "set (default: ids derived from the text's bytes)", **d)
  flags.DEFINE_integer("vocab_size", None, "id range of token-id prompts (default: the "
                       "launched --model's config.json)", **d)
  flags.DEFINE_integer("output_len", 128, "max_tokens of every request", **d)
  flags.DEFINE_bool("ignore_eos", True, "generate exactly --output_len tokens", **d)
  flags.DEFINE_float("temperature", 0.0, "sampling temperature", **d)
  flags.DEFINE_integer("num_prompts", 32, "requests per rate (fresh prompts each)", **d)
  flags.DEFINE_list("request_rates", ["inf"], "requests/s of each run's Poisson arrivals; "
                    "inf sends all at once", **d)
  flags.DEFINE_integer("max_concurrency", None, "at most this many requests in flight", **d)
  flags.DEFINE_list("warmup_ladder", ["1", "2", "4", "8"], "untimed bursts before the "
                    "rates (empty: none)", **d)
  flags.DEFINE_integer("seed", 0, "seed of the arrivals and of random prompts", **d)
  flags.DEFINE_float("request_timeout_s", 600, "per request", **d)
  flags.DEFINE_string("label", None, "the run's name in tables and plots (default: the "
                      "launched --method, else the model name)", **d)
  flags.DEFINE_bool("random_weights", False, "label everything random-weight timing "
                    "(acceptance of random weights means nothing)", **d)
  flags.DEFINE_bool("save_requests", True, "per-request timings in the JSON", **d)
  flags.DEFINE_string("output_json", None, "write the report here (after every rate)", **d)
  flags.DEFINE_string("plot", None, "write a PNG of this run here", **d)
  return fv


# -- prompts ------------------------------------------------------------------------------
class PromptSource:
  """Prompts (str or list[int]) handed out in turn, never the same twice while the set
  lasts: the server caches prompt prefixes, so a prompt seen in the warm-up or an earlier
  rate would be prefilled from the cache (a shorter TTFT, and a prefill shape the warm-up
  did not compile). Random ids are fresh for every request; a prompt set that runs out
  starts over, and `reused` says so in the report."""

  def __init__(self, fv, vocab_size: int | None):
    if fv.endpoint == "chat" and (fv.dataset == "random" or fv.input_len):
      raise BenchError("--endpoint chat sends text: use a prompt set without --input_len")
    if (fv.dataset == "random" or fv.input_len) and vocab_size is None and not fv.tokenizer:
      raise BenchError("token-id prompts need --vocab_size (or --launch with a --model "
                       "directory holding config.json)")
    self.vocab_size, self.reused, self._next = vocab_size, False, 0
    if fv.dataset == "random":
      import numpy as np
      self.length = fv.input_len or 128
      if vocab_size <= _RESERVED_IDS + 1:
        raise BenchError(f"--vocab_size {vocab_size} is too small for random ids")
      self._rng = np.random.default_rng(fv.seed)
      self.prompts = None
      self.info = {"name": "random", "input_len": self.length, "vocab_size": vocab_size,
                   "seed": fv.seed}
      return
    from bench import datasets
    try:
      w = datasets.build_workloads([fv.dataset], None, log=lambda *a: None)[0]
    except ValueError as e:
      raise BenchError(str(e)) from None
    self.prompts, self.info = list(w.prompts), dict(w.info, name=fv.dataset)
    if fv.input_len:
      tok = None
      if fv.tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(fv.tokenizer)
      self.prompts = [datasets.fixed_length_ids(p, fv.input_len, tok,
                                                vocab_size or len(tok)) for p in self.prompts]
      self.info.update(input_len=fv.input_len, tokenization="tokenizer" if tok else
                       "synthetic ids from the text's bytes")

  def take(self, n: int) -> list:
    if self.prompts is None:
      ids = self._rng.integers(_RESERVED_IDS, self.vocab_size, size=(n, self.length))
      return [list(map(int, row)) for row in ids]
    out = []
    for _ in range(n):
      if self._next == len(self.prompts):
        self._next, self.reused = 0, True
      out.append(self.prompts[self._next])
      self._next += 1
    self.info["reused"] = self.reused
    return out


# -- one request --------------------------------------------------------------------------
def request_body(fv, model: str, prompt) -> dict:
  body = {"model": model, "max_tokens": fv.output_len, "temperature": fv.temperature,
          "stream": True, "stream_options": {"include_usage": True},
          "ignore_eos": fv.ignore_eos, "seed": fv.seed}
  if fv.endpoint == "chat":
    body["messages"] = [{"role": "user", "content": prompt}]
  else:
    body["prompt"] = prompt
  return body


async def send(client, url: str, body: dict, chat: bool,
               t_scheduled: float | None = None) -> serve_stats.RequestResult:
  """One streamed request, timed at the client: the arrival of every SSE chunk with text,
  the token counts from the final usage chunk. Never raises: a failure is a result."""
  prompt = body.get("prompt")
  r = serve_stats.RequestResult(ok=False, prompt_len=len(prompt) if isinstance(prompt, list)
                                else 0, t_send=time.perf_counter(), t_end=0.0,
                                t_scheduled=t_scheduled)
  done = usage = False
  try:
    async with client.stream("POST", url, json=body) as resp:
      if resp.status_code != 200:
        text = (await resp.aread()).decode(errors="replace")
        try:
          text = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
          pass
        r.error = f"HTTP {resp.status_code}: {text[:200]}"
        return r
      async for line in resp.aiter_lines():
        if not line.startswith("data:"):
          continue
        data = line[5:].strip()
        if data == "[DONE]":
          done = True
          break
        obj = json.loads(data)
        if "error" in obj:
          r.error = f"server error: {obj['error'].get('message')}"
          return r
        for c in obj.get("choices") or ():
          text = (c.get("delta") or {}).get("content") if chat else c.get("text")
          if text:
            r.chunk_times.append(time.perf_counter())
          r.finish_reason = c.get("finish_reason") or r.finish_reason
        if obj.get("usage"):
          usage = True
          r.output_tokens = obj["usage"]["completion_tokens"]
          r.prompt_len = obj["usage"]["prompt_tokens"]
  except Exception as e:  # noqa: BLE001 - any transport failure is this request's failure
    r.error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return r
  finally:
    r.t_end = time.perf_counter()
  if not done:
    r.error = "the stream ended before data: [DONE]"
  elif not usage:
    r.error = "no usage chunk in the stream (stream_options.include_usage)"
  else:
    r.ok = True
  return r


# -- runs ---------------------------------------------------------------------------------
def parse_rate(s: str) -> float:
  try:
    rate = float(s)
  except ValueError:
    raise BenchError(f"--request_rates: {s!r} is not a number or inf") from None
  if not rate > 0:
    raise BenchError(f"--request_rates: {s} must be > 0 (or inf)")
  return rate


async def scrape(client, base_url: str) -> dict | None:
  try:
    r = await client.get(base_url + "/metrics", timeout=30)
    return serve_stats.parse_prometheus(r.text) if r.status_code == 200 else None
  except Exception:  # noqa: BLE001 - a server without /metrics still gets measured
    return None


async def run_rate(client, fv, url: str, model: str, prompts: list, rate: float,
                   base_url: str) -> dict:
  """One timed run: len(prompts) requests at `rate`, the server's counters around it."""
  chat = fv.endpoint == "chat"
  offsets = serve_stats.arrival_offsets(len(prompts), rate, fv.seed)
  sem = asyncio.Semaphore(fv.max_concurrency) if fv.max_concurrency else None
  before = await scrape(client, base_url)
  t0 = time.perf_counter()

  async def one(prompt, offset):
    await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
    body = request_body(fv, model, prompt)
    if sem is None:
      return await send(client, url, body, chat, t0 + offset)
    async with sem:
      return await send(client, url, body, chat, t0 + offset)

  results = await asyncio.gather(*(one(p, o) for p, o in zip(prompts, offsets)))
  duration = time.perf_counter() - t0
  after = await scrape(client, base_url)
  run = {"request_rate": "inf" if math.isinf(rate) else rate,
         "max_concurrency": fv.max_concurrency, "num_prompts": len(prompts),
         **serve_stats.summarize(results, duration),
         "server": serve_stats.server_deltas(before, after,
                                             speculative=fv.launch is None or
                                             report_method(fv) != "ar")}
  if fv.save_requests:
    run["requests"] = [_request_row(r, t0) for r in results]
  return run


def _request_row(r, t0: float) -> dict:
  ms = lambda x: None if x is None else round(x * 1e3, 3)  # noqa: E731
  return {"ok": r.ok, "send_ms": ms(r.t_send - t0),
          "wait_ms": ms(r.t_send - r.t_scheduled) if r.t_scheduled is not None else None,
          "ttft_ms": ms(r.ttft), "tpot_ms": ms(r.tpot), "e2el_ms": ms(r.e2e),
          "prompt_tokens": r.prompt_len, "output_tokens": r.output_tokens,
          "chunks": len(r.chunk_times), "finish_reason": r.finish_reason, "error": r.error}


async def warmup(client, fv, url: str, model: str, source: PromptSource) -> dict:
  """Bursts of n concurrent requests for each n of the ladder (untimed): the server
  compiles the batch shapes now rather than during a timed rate."""
  t0 = time.perf_counter()
  failed, sizes = 0, [int(x) for x in fv.warmup_ladder if str(x).strip()]
  for n in sizes:
    res = await asyncio.gather(*(send(client, url, request_body(fv, model, p),
                                      fv.endpoint == "chat") for p in source.take(n)))
    bad = [r for r in res if not r.ok]
    failed += len(bad)
    if bad and n == sizes[0]:
      raise BenchError(f"the warm-up request failed: {bad[0].error}")
  return {"ladder": sizes, "failed": failed, "seconds": time.perf_counter() - t0}


# -- the report -----------------------------------------------------------------------------
def _fmt(x, spec=".1f") -> str:
  return "-" if x is None else format(x, spec)


def run_line(label: str, run: dict) -> str:
  s = run.get("server") or {}
  acc = s.get("mean_accepted")
  hit = s.get("cache_hit_rate")
  return (f"[serve_load] {label} rate={run['request_rate']}: {run['completed']}/"
          f"{run['num_prompts']} ok in {run['duration_s']:.1f}s; "
          f"{_fmt(run['request_throughput'], '.2f')} req/s, "
          f"{_fmt(run['output_throughput'])} out tok/s; TTFT med "
          f"{_fmt(run['ttft_ms']['median'])} p99 {_fmt(run['ttft_ms']['p99'])} ms; TPOT med "
          f"{_fmt(run['tpot_ms']['median'], '.2f')} ms; ITL med "
          f"{_fmt(run['itl_ms']['median'], '.2f')} ms; E2E med "
          f"{_fmt(run['e2el_ms']['median'])} ms"
          + (f"; accepted/round {acc:.2f}" if acc is not None else "")
          + (f"; hit rate {hit:.2f}" if hit is not None else ""))


def table(reports: list) -> str:
  head = (f"{'label':<14}{'rate':>6}{'ok':>7}{'req/s':>8}{'tok/s':>9}{'TTFT med':>10}"
          f"{'p99':>9}{'TPOT med':>10}{'p99':>8}{'ITL med':>9}{'E2E med':>10}{'acc':>6}"
          f"{'hit':>6}")
  lines = [head, "-" * len(head)]
  for rep in reports:
    for r in rep.get("runs", []):
      s = r.get("server") or {}
      lines.append(
          f"{rep.get('label', '?'):<14}{str(r['request_rate']):>6}"
          f"{r['completed']:>4}/{r['num_prompts']:<2}{_fmt(r['request_throughput'], '.2f'):>8}"
          f"{_fmt(r['output_throughput']):>9}{_fmt(r['ttft_ms']['median']):>10}"
          f"{_fmt(r['ttft_ms']['p99']):>9}{_fmt(r['tpot_ms']['median'], '.2f'):>10}"
          f"{_fmt(r['tpot_ms']['p99'], '.2f'):>8}{_fmt(r['itl_ms']['median'], '.2f'):>9}"
          f"{_fmt(r['e2el_ms']['median'], '.0f'):>10}{_fmt(s.get('mean_accepted'), '.2f'):>6}"
          f"{_fmt(s.get('cache_hit_rate'), '.2f'):>6}")
  return "\n".join(lines) + "\n(ms; rate in requests/s; acc: accepted draft tokens per " \
                            "round; hit: SSD cache hit rate)"


def _write(report: dict, path: str | None) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1)
  os.replace(tmp, path)


async def measure(fv, report: dict) -> int:
  import httpx
  rates = [parse_rate(s) for s in fv.request_rates]
  if not all(str(x).strip().isdigit() and int(x) > 0 for x in fv.warmup_ladder):
    raise BenchError(f"--warmup_ladder: request counts >= 1, got {','.join(fv.warmup_ladder)}")
  if fv.launch is not None:
    try:
      shlex.split(fv.launch)
    except ValueError as e:
      raise BenchError(f"--launch: {e}") from None
  if fv.max_concurrency is not None and fv.max_concurrency < 1:
    raise BenchError(f"--max_concurrency must be >= 1, got {fv.max_concurrency}")
  server = None
  limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
  timeout = httpx.Timeout(fv.request_timeout_s, connect=30.0)
  async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
    try:
      base_url = fv.base_url.rstrip("/")
      vocab = fv.vocab_size
      if fv.launch is not None:
        log = fv.server_log or (os.path.splitext(fv.output_json)[0] + "_server.log"
                                if fv.output_json else "/tmp/ssd_jax_serve_load_server.log")
        server = LaunchedServer(fv.launch, log)
        report["server"]["launched"] = server.describe()
        vocab = vocab or model_vocab_size(server.argv)
        source = PromptSource(fv, vocab)  # before the server starts: fail fast
        print(f"[serve_load] starting: {server.describe()['command']}", flush=True)
        server.start()
        await server.wait_ready(client, fv.launch_timeout_s)
        base_url = server.url
        print(f"[serve_load] server ready in {server.ready_s:.1f}s", flush=True)
      else:
        source = PromptSource(fv, vocab)
      report["workload"] = source.info
      try:
        models = (await client.get(base_url + "/v1/models", timeout=30)).json()["data"]
      except Exception as e:  # noqa: BLE001 - down, not ours, or not OpenAI-compatible
        raise BenchError(f"no OpenAI-compatible server at {base_url} (GET /v1/models: "
                         f"{type(e).__name__}: {e})") from None
      model = fv.model or models[0]["id"]
      report["server"].update(base_url=base_url, model=model,
                              max_model_len=models[0].get("max_model_len"))
      report["label"] = report["label"] or model
      url = base_url + ("/v1/chat/completions" if fv.endpoint == "chat" else "/v1/completions")
      if fv.warmup_ladder:
        report["warmup"] = await warmup(client, fv, url, model, source)
        print(f"[serve_load] warm-up {report['warmup']}", flush=True)
      for rate in rates:
        run = await run_rate(client, fv, url, model, source.take(fv.num_prompts), rate,
                             base_url)
        report["runs"].append(run)
        print(run_line(report["label"], run), flush=True)
        _write(report, fv.output_json)
      report["partial"] = False
    finally:
      if server is not None:
        code = server.stop()
        report["server"]["launched"] = server.describe()
        print(f"[serve_load] server stopped (exit code {code})", flush=True)
  return 1 if any(r["failed"] for r in report["runs"]) else 0


def report_method(fv) -> str | None:
  """The launched server's --method (ar when not given: the server's default)."""
  if fv.launch is None:
    return None
  try:
    return flag_value(shlex.split(fv.launch), "method") or "ar"
  except ValueError:  # unbalanced quotes: measure() says so
    return None


def new_report(fv) -> dict:
  label = fv.label or report_method(fv)
  return {"tool": "bench/serve_load.py", "schema_version": 1, "label": label,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "random_weights": fv.random_weights,
          "timing_label": RANDOM_LABEL if fv.random_weights else None,
          "partial": True, "endpoint": fv.endpoint, "method": report_method(fv),
          "config": {k: fv[k].value for k in _FLAG_NAMES},
          "server": {"launched": None}, "workload": None, "warmup": None, "runs": [],
          "errors": []}


_FLAG_NAMES = ("base_url", "launch", "model", "endpoint", "dataset", "input_len", "tokenizer",
               "vocab_size", "output_len", "ignore_eos", "temperature", "num_prompts",
               "request_rates", "max_concurrency", "warmup_ladder", "seed",
               "request_timeout_s", "label", "random_weights")


def main(fv) -> int:
  import logging
  logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
  report = new_report(fv)
  loop = asyncio.new_event_loop()
  task = loop.create_task(measure(fv, report))
  got = []

  def on_signal(signum):
    got.append(signum)
    task.cancel()

  for s in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(s, on_signal, s)
  try:
    code = loop.run_until_complete(task)
  except asyncio.CancelledError:
    code = 128 + (got[0] if got else signal.SIGTERM)
    report["errors"].append(f"interrupted by signal {got[0] if got else '?'}")
    print("[serve_load] interrupted: partial results", file=sys.stderr, flush=True)
  except BenchError as e:
    report["errors"].append(str(e))
    _write(report, fv.output_json)
    print(f"serve_load: error: {e}", file=sys.stderr)
    return 2
  finally:
    loop.close()
  _write(report, fv.output_json)
  if report["runs"]:
    print(table([report]), flush=True)
  if fv.plot and report["runs"]:
    from bench import serve_plot
    try:
      print(f"[serve_load] plot: {serve_plot.plot([report], fv.plot)}", flush=True)
    except serve_plot.PlotUnavailable as e:
      print(f"[serve_load] WARNING: {e}", file=sys.stderr)
  return code


if __name__ == "__main__":
  from absl import app
  flag_values = define_flags()
  app.run(lambda argv: sys.exit(main(flag_values) if len(argv) == 1 else
                                (print(f"serve_load: error: unexpected arguments {argv[1:]}",
                                       file=sys.stderr) or 2)))
