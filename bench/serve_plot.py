r"""The serving benchmark's PNG: latency against throughput, one line per method (one
bench/serve_load.py JSON each), one point per request rate, labelled with the rate.

  PYTHONPATH=$PWD python bench/serve_plot.py --inputs out/ar.json,out/sd.json \
      --out out/serve_load.png [--table]

Panels: TTFT, TPOT and E2E latency (median solid, p99 dashed) over output tokens/s, so a
method further right at the same height serves more at the same latency. The table is
bench/serve_load.py's, for every input.
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.plot import PlotUnavailable, _pyplot, _save  # the same matplotlib conventions

__all__ = ["PlotUnavailable", "plot", "main"]

_PANELS = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("e2el_ms", "E2E latency (ms)"))


def plot(reports: list, out_path: str, dpi: int = 120) -> str:
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(_PANELS), figsize=(5.2 * len(_PANELS), 4.2))
  for ax, (key, title) in zip(axes, _PANELS):
    for i, rep in enumerate(reports):
      runs = [r for r in rep.get("runs", []) if r.get("output_throughput") is not None]
      runs.sort(key=lambda r: r["output_throughput"])
      x = [r["output_throughput"] for r in runs]
      color = f"C{i % 10}"
      for stat, style in (("median", "-o"), ("p99", "--x")):
        y = [r[key][stat] for r in runs]
        ax.plot(x, y, style, color=color, label=f"{rep.get('label', '?')} {stat}")
      for r, xi in zip(runs, x):
        rate = r["request_rate"]
        ax.annotate(f"{rate:g}/s" if isinstance(rate, (int, float)) else f"{rate}/s", (xi, r[key]["median"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3), color=color)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel(title)
    ax.set_title(title.split(" (")[0])
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  random_w = any(rep.get("random_weights") for rep in reports)
  work = (reports[0].get("workload") or {}) if reports else {}
  cfg = (reports[0].get("config") or {}) if reports else {}
  fig.suptitle("serving: latency vs throughput"
               + (f" - {reports[0].get('timing_label')}" if random_w else "")
               + f" (prompts {work.get('name', '?')}, in {work.get('input_len', 'text')}, "
               f"out {cfg.get('output_len', '?')} tokens)", fontsize=10)
  fig.tight_layout()
  return _save(fig, plt, out_path, dpi)


def main(argv=None) -> int:
  from absl import flags
  fv = flags.FlagValues()
  flags.DEFINE_list("inputs", None, "bench/serve_load.py JSON files", flag_values=fv)
  flags.DEFINE_string("out", None, "PNG to write", flag_values=fv)
  flags.DEFINE_bool("table", False, "print the table of every input", flag_values=fv)
  rest = fv(argv if argv is not None else sys.argv)
  if len(rest) > 1 or not fv.inputs:
    print("serve_plot: error: give --inputs a.json[,b.json...] (and --out X.png or --table)",
          file=sys.stderr)
    return 2
  reports = []
  for path in fv.inputs:
    try:
      with open(path) as f:
        reports.append(json.load(f))
    except (OSError, ValueError) as e:
      print(f"serve_plot: error: cannot read {path}: {e}", file=sys.stderr)
      return 2
  if fv.table:
    from bench.serve_load import table
    print(table(reports))
  if fv.out:
    try:
      print(plot(reports, fv.out))
    except PlotUnavailable as e:
      print(f"serve_plot: error: {e}", file=sys.stderr)
      return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
