r"""The embedded default on a CPU: our engine next to PyTorch + transformers, back to back.

Runs the README's prompt (chat template, greedy, float32, batch 1) through

  * our engine: AR, and SD with the bundled draft, for each page pool of --pools
    ("BxL": LLM(max_batch_size=B, max_model_len=L); 8x2048 is the CLI's default pool);
  * the peer: transformers `generate` on the same converted weights, eager, float32,
    dynamic cache (bench/peer_transformers.py's Peer with compile off),

back to back, with the timed repetitions interleaved (engine configs, then the peer, per
repetition) so that a CPU shared with other work slows every side alike. The peer runs in
a worker process of its own: in one process with JAX, PyTorch's threads and XLA's contend
and the peer decodes ~5x slower than alone (measured: 4.7 vs 22 tok/s), which would flatter
us. Prints decode
tok/s (tokens after the first over the time after the first), ms/token and TTFT, median
and best over --reps, the speed-ups that issue 16 asks for, and whether our AR tokens equal
the peer's.

  python bench/cpu_default.py                          # AR + SD, both pools, the peer
  python bench/cpu_default.py --methods ar --pools 1x512,8x2048 --no-peer --reps 5
  python bench/cpu_default.py --output_json /tmp/cpu.json

Compilation is not timed (one untimed generate per config first); `load_s` and
`warm_s` in the JSON say what building and that first generate took.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

PROMPT = "Write a Python function that checks whether a number is prime."


def _peer_class():
  path = os.path.join(_ROOT, "bench", "peer_transformers.py")
  spec = importlib.util.spec_from_file_location("_peer_transformers", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.Peer


def _peer_worker(model_dir: str) -> None:
  """The peer's process (no JAX in it): one JSON request per stdin line, one reply each."""
  import torch
  import transformers
  log = lambda *a: print(*a, file=sys.stderr, flush=True)
  peer = _peer_class()(model=model_dir, dtype="float32", device="cpu", compile="off", log=log)
  peer.setup_ar()
  info = {"mode": peer.ar_mode, "torch": torch.__version__,
          "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    req = json.loads(line)
    ids = torch.tensor([req["ids"]])
    if req.get("warm"):
      peer.timed(ids, req["tokens"], **peer.ar_kwargs)
      print(json.dumps({}), flush=True)
      continue
    _, t1 = peer.timed(ids, 1, **peer.ar_kwargs)
    out, tn = peer.timed(ids, req["tokens"], **peer.ar_kwargs)
    print(json.dumps({"t1": t1, "tn": tn, "tokens": out[0, len(req["ids"]):].tolist()}),
          flush=True)


class _PeerProcess:
  def __init__(self, model_dir: str):
    import subprocess
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_peer_worker",
                                  model_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
    self.info = json.loads(self.proc.stdout.readline())

  def ask(self, **req) -> dict:
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    return json.loads(self.proc.stdout.readline())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def _summary(xs):
  return {"median": statistics.median(xs), "best": max(xs), "all": xs}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--tokens", type=int, default=128, help="new tokens per generate")
  ap.add_argument("--reps", type=int, default=3, help="timed repetitions (interleaved)")
  ap.add_argument("--pools", default="1x512,8x2048", help="page pools, BxL, comma-separated")
  ap.add_argument("--methods", default="ar,sd", help="ar and/or sd")
  ap.add_argument("--k", default=None, help="SD draft tokens, comma-separated for several "
                  "(default: LLM's)")
  ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
  ap.add_argument("--prompt", default=PROMPT)
  ap.add_argument("--output_json", default=None)
  ap.add_argument("--_peer_worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args._peer_worker:
    return _peer_worker(args._peer_worker)

  import jax
  from ssd_jax import LLM, SamplingParams
  from ssd_jax.checkpoint import embedded_model_dir, load_tokenizer

  pools = [tuple(int(v) for v in p.lower().split("x")) for p in args.pools.split(",") if p]
  methods = [m for m in args.methods.split(",") if m]
  params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
  tokenizer = load_tokenizer(None)
  ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                      add_generation_prompt=True, tokenize=True)
  if isinstance(ids, dict) or hasattr(ids, "keys"):
    ids = ids["input_ids"]
  ids = list(ids)
  engines = {}
  ks = [int(k) for k in args.k.split(",")] if args.k else [None]
  for b, l in pools:
    for m, k in [(m, k) for m in methods for k in (ks if m != "ar" else [None])]:
      name = f"{m} {b}x{l}" + (f" k={k}" if k and len(ks) > 1 else "")
      t0 = time.perf_counter()
      llm = LLM(method=m, max_batch_size=b, max_model_len=l, dtype="float32",
                **({"k": k} if k else {}))
      load_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      llm.generate([ids], params)
      engines[name] = {"llm": llm, "load_s": load_s, "warm_s": time.perf_counter() - t0,
                       "num_pages": llm.target.num_pages, "runs": []}
      print(f"[ours] {name}: {llm.target.num_pages} pages, built in {load_s:.1f}s, "
            f"first generate (compiles) {engines[name]['warm_s']:.1f}s", flush=True)

  peer = None
  if args.peer:
    peer = _PeerProcess(embedded_model_dir())
    peer.ask(ids=ids, tokens=args.tokens, warm=True)
    peer_runs = []

  ours_tokens = None
  for rep in range(args.reps):
    for name, e in engines.items():
      out = e["llm"].generate([ids], params)[0]
      m = e["llm"].last_metrics
      e["runs"].append({"decode_tok_s": m["decode_tokens_per_s"], "ttft_s": m["ttft_s"],
                        "mean_accepted": m.get("mean_accepted")})
      if name.startswith("ar") and ours_tokens is None:
        ours_tokens = list(out.token_ids)
    if peer is not None:
      c0, w0 = time.process_time(), time.perf_counter()
      r = peer.ask(ids=ids, tokens=args.tokens)
      r["ours_cpu_while_peer"] = (time.process_time() - c0) / (time.perf_counter() - w0)
      print(f"    (our process used {r['ours_cpu_while_peer']:.2f} CPUs while the peer ran)")
      peer_tokens = r["tokens"]
      peer_runs.append({"decode_tok_s": (args.tokens - 1) / max(r["tn"] - r["t1"], 1e-9),
                        "ttft_s": r["t1"]})
    print(f"  rep {rep + 1}/{args.reps}: " + ", ".join(
        f"{n} {e['runs'][-1]['decode_tok_s']:.1f}" for n, e in engines.items())
        + (f", peer {peer_runs[-1]['decode_tok_s']:.1f}" if peer else "") + " tok/s",
        flush=True)

  report = {"schema": "ssd_jax.cpu_default/1", "prompt": args.prompt, "prompt_tokens": len(ids),
            "tokens": args.tokens, "reps": args.reps,
            "env": {"python": platform.python_version(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg()},
            "ours": {}, "peer": None}
  print(f"\nprompt {len(ids)} tokens, {args.tokens} new, greedy float32 batch 1, "
        f"{args.reps} reps (median / best); load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs")
  print(f"{'':22s} {'decode tok/s':>16s} {'ms/token':>14s} {'TTFT ms':>9s}  notes")
  for name, e in engines.items():
    tok = _summary([r["decode_tok_s"] for r in e["runs"]])
    ttft = statistics.median(r["ttft_s"] for r in e["runs"])
    acc = e["runs"][-1]["mean_accepted"]
    report["ours"][name] = {"decode_tok_s": tok, "ttft_s": ttft, "num_pages": e["num_pages"],
                            "load_s": e["load_s"], "warm_s": e["warm_s"],
                            "mean_accepted": acc}
    note = f"{e['num_pages']} pages" + (f", accepted {acc:.2f}/round" if acc else "")
    print(f"ours {name:17s} {tok['median']:7.1f} / {tok['best']:6.1f} "
          f"{1e3 / tok['median']:6.1f} / {1e3 / tok['best']:5.1f} {1e3 * ttft:9.1f}  {note}")
  if peer is not None:
    peer.close()
    tok = _summary([r["decode_tok_s"] for r in peer_runs])
    ttft = statistics.median(r["ttft_s"] for r in peer_runs)
    same = sum(1 for _ in itertools.takewhile(lambda ab: ab[0] == ab[1],
                                              zip(ours_tokens or [], peer_tokens)))
    report["peer"] = {"decode_tok_s": tok, "ttft_s": ttft, **peer.info,
                      "tokens_equal_to_ours_ar": same}
    print(f"peer {'transformers':17s} {tok['median']:7.1f} / {tok['best']:6.1f} "
          f"{1e3 / tok['median']:6.1f} / {1e3 / tok['best']:5.1f} {1e3 * ttft:9.1f}  "
          f"{peer.info['mode']}, {peer.info['torch_threads']} threads, own process")
    print(f"our AR tokens equal the peer's for the first {same}/{args.tokens}")
    med = {n: e["decode_tok_s"]["median"] for n, e in report["ours"].items()}
    for n, v in med.items():
      print(f"  {n}: {v / tok['median']:.2f}x the peer")
  ar = {n: e["decode_tok_s"]["median"] for n, e in report["ours"].items() if n.startswith("ar")}
  sd = {n: e["decode_tok_s"]["median"] for n, e in report["ours"].items() if n.startswith("sd")}
  for n, v in sd.items():
    a = ar.get("ar" + n[2:].split(" k=")[0])
    if a:
      print(f"  {n}: {v / a:.2f}x our AR on the same pool")
  if len(ar) > 1:
    ms = {n: 1e3 / v for n, v in ar.items()}
    lo = min(ms.values())
    print("  AR ms/token by pool: " + ", ".join(f"{n[3:]} {v:.1f}" for n, v in ms.items())
          + f" (max/min {max(ms.values()) / lo:.2f})")
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
