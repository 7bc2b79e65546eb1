r"""Plot and tabulate benchmark JSON: tokens/s per method per dataset, and speed-up over AR.

  PYTHONPATH=$PWD python bench/plot.py --bench out/bench.json [--peer out/peer.json] \
      --out out/bench.png
  PYTHONPATH=$PWD python bench/plot.py --bench out/bench.json --peer out/peer.json --table

Random-weight results ('random-weight timing') get no speed-up panel values: acceptance
from random weights is meaningless, so the panel says so instead. `plot_runs` draws the
bar chart of bench/probes/ssd_timing.py's runs.
"""

from __future__ import annotations

import json
import os
import sys

from bench.report import fmt, format_table

MISSING_MATPLOTLIB = ("matplotlib is not installed, so no plot was written (the JSON "
                      "results are complete). Install it with `pip install matplotlib`, or "
                      "plot later on another machine: python bench/plot.py --bench X.json "
                      "--out X.png")


class PlotUnavailable(RuntimeError):
  pass


def _pyplot():
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise PlotUnavailable(MISSING_MATPLOTLIB) from None
  return plt


def _series(report: dict | None, peer: dict | None):
  """[(label, dataset, batch_size, tokens_per_s, panel-2 value or None)] from both reports.
  Panel 2 is the speed-up over AR, or for random weights (no speed-up claimed) the
  achieved fraction of the memory roofline."""
  out = []
  random_w = bool((report or {}).get("random_weights"))
  for r in (report or {}).get("results", []):
    second = ((r.get("roofline") or {}).get("achieved_fraction") if random_w
              else r.get("speedup_over_ar"))
    out.append((f"ours-{r['method']}", r["dataset"], r["batch_size"], r.get("tokens_per_s"),
                second))
  for r in (peer or {}).get("results", []):
    out.append((f"hf-{r['method']}", r.get("dataset", "?"), r.get("batch_size", 1),
                r.get("tokens_per_s"), peer_roofline_fraction(report, r) if random_w else None))
  return out


def peer_roofline_fraction(report: dict | None, r: dict) -> float | None:
  """The peer's achieved roofline fraction, with the floor of our matching row (same
  model, bandwidth and method): floor / the peer's time per round."""
  for o in (report or {}).get("results", []):
    if (o["method"], o["dataset"], o["batch_size"]) == (r["method"], r.get("dataset"),
                                                         r.get("batch_size", 1)):
      floor = (o.get("roofline") or {}).get("round_floor_ms")
      ms = r.get("ms_per_token")
      if not floor or not ms:
        return None
      per_round = ms * (r.get("mean_tokens_per_round") or 1.0) if r["method"] != "ar" else ms
      return floor / per_round
  return None


def _save(fig, plt, out_path: str, dpi: int) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=dpi)
  plt.close(fig)
  return out_path


def plot(report: dict | None, out_path: str, peer: dict | None = None) -> str:
  """The harness's PNG: tokens/s per method and dataset, and the speed-up over AR (or,
  for random weights, the achieved roofline fraction)."""
  plt = _pyplot()
  rows = [s for s in _series(report, peer) if s[3]]
  if not rows:
    raise PlotUnavailable("nothing to plot: no result has a tokens/s value")
  random_w = bool((report or {}).get("random_weights") or (peer or {}).get("random_weights"))
  groups = sorted({(d, b) for _, d, b, _, _ in rows}, key=lambda g: (g[1], g[0]))
  labels = sorted({s[0] for s in rows},
                  key=lambda m: (m.startswith("hf-"), ["ar", "sd", "ssd"].index(m.split("-")[1])
                                 if m.split("-")[1] in ("ar", "sd", "ssd") else 9, m))
  width = 0.8 / max(1, len(labels))
  fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(groups) + 6), 4.8))
  ax, ax2 = axes
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, lab in enumerate(labels):
    xs, ys, sp_x, sp_y = [], [], [], []
    for gi, (d, b) in enumerate(groups):
      for s in rows:
        if s[0] == lab and s[1] == d and s[2] == b:
          xs.append(gi + (i - (len(labels) - 1) / 2) * width)
          ys.append(s[3])
          if s[4] is not None:
            sp_x.append(xs[-1])
            sp_y.append(s[4])
    hatch = "//" if lab.startswith("hf-") else None
    bars = ax.bar(xs, ys, width, label=lab, color=colors[i % len(colors)], hatch=hatch)
    ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=7)
    if sp_x:
      b2 = ax2.bar(sp_x, sp_y, width, label=lab, color=colors[i % len(colors)])
      ax2.bar_label(b2, labels=[f"{y:.2f}" if random_w else f"{y:.2f}x" for y in sp_y],
                    fontsize=7)
  ticks = [f"{d}\nbs={b}" for d, b in groups]
  for a in axes:
    a.set_xticks(range(len(groups)))
    a.set_xticklabels(ticks, fontsize=8)
  ax.set_ylabel("output tokens / s")
  ax.set_title("throughput" + (" (random-weight timing)" if random_w else ""))
  ax.legend(fontsize=8)
  ax2.axhline(1.0, color="gray", lw=1, ls="--")
  ax2.set_xlim(ax.get_xlim())
  if random_w:
    ax2.set_ylabel("roofline floor / measured round time")
    ax2.set_title("achieved fraction of the memory roofline")
    top = max([1.0] + [s[4] for s in rows if s[4] is not None])
    ax2.set_ylim(0, top * 1.3)
    ax2.text(0.5, 0.97, "random weights: acceptance is meaningless,\nno speed-up is claimed",
             ha="center", va="top", transform=ax2.transAxes, fontsize=9, color="darkred",
             bbox={"facecolor": "white", "edgecolor": "none"})
    if not ax2.patches:
      ax2.text(0.5, 0.5, "no roofline numbers", ha="center", va="center",
               transform=ax2.transAxes)
  else:
    ax2.set_ylabel("speed-up over our AR")
    ax2.set_title("speed-up over AR (same dataset, batch size)")
  if not random_w and not ax2.patches:
    ax2.text(0.5, 0.5, "no AR baseline in these results", ha="center", va="center",
             transform=ax2.transAxes)
  cfg = (report or peer or {}).get("config", {})
  name = lambda p: os.path.basename(str(p).rstrip("/")) if p else None  # noqa: E731
  model = cfg.get("model_shape") or name(cfg.get("model")) or (
      "tiny in-memory model" if cfg.get("engine") == "tiny" else "embedded default")
  draft = cfg.get("draft_shape") or name(cfg.get("draft")) or "-"
  fig.suptitle(f"target {model}, draft {draft}, K={cfg.get('k', '?')}, F={cfg.get('f', '?')}, "
               f"{cfg.get('dtype', '?')}, {cfg.get('output_len', '?')} new tokens", fontsize=10)
  fig.tight_layout()
  return _save(fig, plt, out_path, 110)


def plot_runs(results: dict, out_path: str, peer: dict | None = None) -> str:
  """bench/probes/ssd_timing.py's bar chart: decode tokens/s of each run, and the
  transformers peer's AR beside them."""
  plt = _pyplot()
  names, values = [], []
  for name, m in results["runs"].items():
    if "decode_tokens_per_s" in m:
      names.append(name)
      values.append(m["decode_tokens_per_s"])
  for row in (peer or {}).get("results", []):
    if row.get("method") == "ar" and row.get("decode_tokens_per_s"):
      names.append("transformers AR")
      values.append(row["decode_tokens_per_s"])
      break
  fig, ax = plt.subplots(figsize=(8, 3.6))
  bars = ax.bar(names, values, color=["#4c72b0"] * len(names))
  ax.bar_label(bars, labels=[f"{v:.0f}" for v in values])
  ax.set_ylabel("decode tokens/s")
  ax.set_title(f"{results['target']} target, {results['draft']} draft, batch "
               f"{results['batch']}, K={results['k']} (random-weight timing)", fontsize=9)
  plt.setp(ax.get_xticklabels(), rotation=15, fontsize=8)
  fig.tight_layout()
  return _save(fig, plt, out_path, 120)


def peer_table(peer: dict, report: dict | None = None) -> str:
  lines = [f"{'peer (transformers)':<22}{'bs':>3}{'tok/s':>9}{'dec tok/s':>10}{'ms/token':>10}"
           f"{'roofline':>9}{'TTFT ms':>9}  mode"]
  for r in peer.get("results", []):
    lines.append(f"{'hf-' + r['method'] + ' ' + r.get('dataset', ''):<22}"
                 f"{r.get('batch_size', 1):>3}{fmt(r.get('tokens_per_s'), '.1f'):>9}"
                 f"{fmt(r.get('decode_tokens_per_s'), '.1f'):>10}"
                 f"{fmt(r.get('ms_per_token'), '.2f'):>10}"
                 f"{fmt(peer_roofline_fraction(report, r), '.2f'):>9}"
                 f"{fmt(None if r.get('ttft_s') is None else 1e3 * r['ttft_s'], '.1f'):>9}"
                 f"  {r.get('mode', '')}")
  for e in peer.get("errors", []):
    lines.append(f"  error: {e}")
  return "\n".join(lines)


def agreement(report: dict, peer: dict) -> str | None:
  """How many leading greedy tokens our AR and the peer's AR share (same weights): a
  sanity check of the model code, not an exactness test (bf16 kernels differ)."""
  ours = [r for r in report.get("results", []) if r["method"] == "ar" and r.get("token_ids")]
  theirs = [r for r in peer.get("results", []) if r["method"] == "ar" and r.get("token_ids")]
  if not ours or not theirs:
    return None
  a, b = ours[0]["token_ids"][0], theirs[0]["token_ids"][0]
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return (f"our AR and the peer's AR agree on the first {n} of {min(len(a), len(b))} "
          "greedy tokens of prompt 0")


def main(argv=None) -> int:
  import argparse
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--bench", help="bench/harness.py JSON")
  p.add_argument("--peer", help="peer_transformers.py JSON")
  p.add_argument("--out", help="PNG to write")
  p.add_argument("--table", action="store_true", help="print the tables")
  a = p.parse_args(argv)
  report = peer = None
  for path, name in ((a.bench, "bench"), (a.peer, "peer")):
    if path:
      if not os.path.isfile(path):
        print(f"plot: {name} JSON {path} does not exist", file=sys.stderr)
        continue
      with open(path) as f:
        d = json.load(f)
      if name == "bench":
        report = d
      else:
        peer = d
  if report is None and peer is None:
    print("plot: no results to show", file=sys.stderr)
    return 2
  rc = 0
  if a.out:
    try:
      plot(report, a.out, peer=peer)
      print(f"plot written to {a.out}")
    except PlotUnavailable as e:
      print(f"plot: {e}", file=sys.stderr)
      rc = 3
  if a.table:
    if report:
      print(format_table(report))
    if peer:
      print(peer_table(peer, report))
    if report and peer:
      ag = agreement(report, peer)
      if ag:
        print(ag)
      ours = {r["dataset"]: r["tokens_per_s"] for r in report.get("results", [])
              if r["method"] == "ar" and r["batch_size"] == 1 and r.get("tokens_per_s")}
      for r in peer.get("results", []):
        base = ours.get(r.get("dataset"))
        if base and r.get("tokens_per_s") and r["method"] == "ar":
          print(f"our AR / peer AR ({r.get('mode', '')}): {base / r['tokens_per_s']:.2f}x")
  return rc


if __name__ == "__main__":
  sys.exit(main())
