"""How often XLA re-records its CUDA graphs, read from XLA's own log.

XLA runs a program's straight-line kernels as command buffers (CUDA graphs). Before each
execution it compares the buffers the graph's commands use with those of the last
execution; if any moved, it records the command sequence again before launching it. That
re-recording is host time proportional to the number of commands, paid per call.

Run any GPU program with XLA's command-buffer log on, then summarise the log:

  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 \\
      python bench/probes/fixed_cost.py ... 2> xla.log
  python bench/probes/graph_updates.py xla.log [--output_json out.json]

It reports executions, updates (re-recordings), the allocations that changed per update
and the time an update took, per graph size (number of commands).
"""

from __future__ import annotations

import collections
import json
import re
import statistics
import sys

# XLA's wording (jax 0.11.2; older releases said "Update command buffer on device").
_UPDATE = re.compile(r"Update command buffer .*?num_commands=(\d+); updated_allocs=(\d+)")
_UPDATED = re.compile(r"Updated command buffer in (\d+) .s; num_commands=(\d+)")
_EXECUTE = re.compile(r"Execute command buffer[; ]")


def summarise(lines) -> dict:
  executions = 0
  allocs = collections.defaultdict(list)
  micros = collections.defaultdict(list)
  for line in lines:
    if _EXECUTE.search(line):
      executions += 1
    elif m := _UPDATE.search(line):
      allocs[int(m.group(1))].append(int(m.group(2)))
    elif m := _UPDATED.search(line):
      micros[int(m.group(2))].append(int(m.group(1)))
  by_size = []
  for n in sorted(set(allocs) | set(micros), reverse=True):
    a, us = allocs.get(n, []), micros.get(n, [])
    by_size.append({"num_commands": n, "updates": len(a),
                    "updated_allocs_median": statistics.median(a) if a else None,
                    "update_us_median": statistics.median(us) if us else None,
                    "update_us_total": sum(us)})
  return {"executions": executions, "updates": sum(len(a) for a in allocs.values()),
          "by_size": by_size}


def main(argv) -> int:
  if len(argv) < 2:
    print("usage: graph_updates.py XLA_LOG [--output_json OUT]", file=sys.stderr)
    return 2
  with open(argv[1], errors="replace") as f:
    res = summarise(f)
  print(f"{res['executions']} command-buffer executions, {res['updates']} re-recordings")
  for row in res["by_size"][:12]:
    print(f"  {row['num_commands']:5d} commands: {row['updates']:5d} updates, "
          f"median {row['updated_allocs_median']} allocations moved, "
          f"median {row['update_us_median']} us each, "
          f"{row['update_us_total'] / 1e3:.1f} ms in all")
  if "--output_json" in argv:
    with open(argv[argv.index("--output_json") + 1], "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
