"""How many kernels a compiled program launches, read from its optimized HLO text.

At batch 1 a decode step is latency-bound: dozens of small kernels per layer, each a few
microseconds, so the number of kernels per step matters as much as the bytes they read.
`kernel_counts(compiled.as_text())` counts what the device executes per call:

* every fusion and custom call (cuBLAS GEMMs, Pallas/Triton kernels, top-k, ...) of the
  computations that run (the entry, loop bodies, conditional branches, called
  computations such as XLA's command buffers), not the bodies of fusions;
* loop bodies times their trip count when XLA knows it (scan loops always have one);
* for a conditional, both its cheapest and its costliest branch ("min" / "max": e.g. an
  SSD lookup that hits skips the drafting branch).

GEMMs are the fusions that contain a dot (Triton GEMMs, CPU library calls), custom calls
whose target names a GEMM (cuBLAS), and bare dots. Counting is textual and approximate
(another XLA version may name things differently), meant for before/after comparisons of
the same program on the same machine.
"""

from __future__ import annotations

import dataclasses
import json
import re

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
              "add-dependency", "opt-barrier", "partition-id", "replica-id", "domain",
              "get-dimension-size", "set-dimension-size"}
_GEMM_TARGET = re.compile(r"gemm|matmul|cublas|\$dot", re.I)


@dataclasses.dataclass
class _Comp:
  name: str
  lines: list


def _computations(text: str) -> tuple[dict, str | None]:
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    if cur is None:
      m = _HEADER.match(line)
      if m and "=" not in line.split("(")[0]:
        cur = _Comp(m.group(2), [])
        if m.group(1):
          entry = cur.name
      continue
    if line.strip() == "}":
      comps[cur.name] = cur
      cur = None
    else:
      cur.lines.append(line)
  return comps, entry


def _attr(rest: str, key: str) -> str | None:
  m = re.search(key + r"=%?([\w.\-]+)", rest)
  return m.group(1) if m else None


@dataclasses.dataclass
class Counts:
  """Kernel launches of one execution (loops expanded), by kind."""
  gemms: int = 0
  fusions: int = 0        # non-GEMM fusions
  custom_calls: int = 0   # non-GEMM custom calls (Pallas kernels, top-k, sort, ...)
  other: int = 0          # unfused ops that still launch work (copy, scatter, sort, ...)
  graphs: int = 0         # calls of XLA command buffers (each one graph launch)

  @property
  def kernels(self) -> int:
    return self.gemms + self.fusions + self.custom_calls + self.other

  def scaled(self, n: int) -> "Counts":
    return Counts(*(n * getattr(self, f.name) for f in dataclasses.fields(self)))

  def __add__(self, o: "Counts") -> "Counts":
    return Counts(*(getattr(self, f.name) + getattr(o, f.name)
                    for f in dataclasses.fields(self)))

  def as_dict(self) -> dict:
    return {"kernels": self.kernels, **dataclasses.asdict(self)}


class _Counter:
  def __init__(self, text: str):
    self.comps, self.entry = _computations(text)
    self.memo: dict = {}
    self.loops: list = []
    self.conditionals = 0

  def has_dot(self, comp_name: str, depth: int = 0) -> bool:
    comp = self.comps.get(comp_name)
    if comp is None or depth > 4:
      return False
    for line in comp.lines:
      m = _INSTR.match(line)
      if not m:
        continue
      if m.group(3) in ("dot", "convolution", "ragged-dot", "scaled-dot"):
        return True
      if m.group(3) == "fusion" and self.has_dot(_attr(m.group(4), "calls") or "", depth + 1):
        return True
    return False

  def count(self, comp_name: str, pick) -> Counts:
    """Launches of one execution of `comp_name`; `pick` chooses among branches."""
    key = (comp_name, pick)
    if key in self.memo:
      return self.memo[key]
    total = Counts()
    comp = self.comps.get(comp_name)
    for line in comp.lines if comp else []:
      m = _INSTR.match(line)
      if not m:
        continue
      op, rest = m.group(3), m.group(4)
      if op in _NO_KERNEL or op.endswith("-done"):
        continue
      if op == "fusion":
        if self.has_dot(_attr(rest, "calls") or ""):
          total.gemms += 1
        else:
          total.fusions += 1
      elif op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        if target and _GEMM_TARGET.search(target.group(1)):
          total.gemms += 1
        else:
          total.custom_calls += 1
      elif op in ("dot", "convolution"):
        total.gemms += 1
      elif op == "while":
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        n = int(trip.group(1)) if trip else 1
        if pick == "max":
          self.loops.append(n if trip else None)
        body = self.count(_attr(rest, "body") or "", pick).scaled(n)
        # Without a known trip count the condition runs on every iteration (and its
        # result goes back to the host); with one, XLA drives the loop by the count.
        if not trip:
          body = body + self.count(_attr(rest, "condition") or "", pick)
        total = total + body
      elif op == "conditional":
        if pick == "max":
          self.conditionals += 1
        m_br = re.search(r"branch_computations=\{([^}]*)\}", rest)
        names = ([b.strip().lstrip("%") for b in m_br.group(1).split(",")] if m_br else
                 [x for x in (_attr(rest, "true_computation"),
                              _attr(rest, "false_computation")) if x])
        branches = [self.count(b, pick) for b in names] or [Counts()]
        choose = max if pick == "max" else min
        total = total + choose(branches, key=lambda c: c.kernels)
      elif op == "call":
        callee = _attr(rest, "to_apply") or ""
        inner = self.count(callee, pick)
        if "command_buffer" in callee:
          inner = inner + Counts(graphs=1)
        total = total + inner
      else:
        total.other += 1
    self.memo[key] = total
    return total


def kernel_counts(hlo_text: str) -> dict:
  """{'kernels', 'gemms', 'fusions', 'custom_calls', 'other', 'graphs', 'kernels_min',
  'while_trip_counts', 'conditionals'} for one execution of the compiled program."""
  c = _Counter(hlo_text)
  if c.entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  most = c.count(c.entry, "max")
  least = c.count(c.entry, "min")
  out = most.as_dict()
  out["kernels_min"] = least.kernels
  out["while_trip_counts"] = c.loops
  out["conditionals"] = c.conditionals
  return out


def compiled_stats(jitted, *args, **kwargs) -> dict:
  """kernel_counts of `jitted` lowered and compiled for these arguments (arrays or
  jax.ShapeDtypeStruct; static arguments as for a call)."""
  return kernel_counts(jitted.lower(*args, **kwargs).compile().as_text())


def _fused_ops(c: _Counter, comp_name: str, depth: int = 0) -> list[str]:
  """The opcodes a fused computation executes (nested fusions included), in order."""
  comp = c.comps.get(comp_name)
  ops = []
  for line in comp.lines if comp and depth <= 4 else []:
    m = _INSTR.match(line)
    if not m or m.group(3) in _NO_KERNEL:
      continue
    if m.group(3) == "fusion":
      ops += _fused_ops(c, _attr(m.group(4), "calls") or "", depth + 1)
    else:
      ops.append(m.group(3))
  return ops


def launches(hlo_text: str) -> list[dict]:
  """What one execution launches, in program order: {"name", "kind" (gemm, fusion,
  custom-call or the op), "shape" (the result's), "ops" (a fusion's opcodes, or a custom
  call's target)}. Loop bodies and called computations (command buffers) appear once, at
  their place; for a conditional, its first branch. This tells which ops XLA left in a
  kernel of its own, e.g. a layer's norms and residual adds beside its GEMMs."""
  c = _Counter(hlo_text)
  if c.entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  out = []

  def walk(comp_name: str, depth: int):
    comp = c.comps.get(comp_name)
    for line in comp.lines if comp and depth <= 8 else []:
      m = _INSTR.match(line)
      if not m:
        continue
      name, shape, op, rest = m.groups()
      if op in _NO_KERNEL or op.endswith("-done"):
        continue
      if op == "while":
        walk(_attr(rest, "body") or "", depth + 1)
      elif op == "conditional":
        m_br = re.search(r"branch_computations=\{([^}]*)\}", rest)
        first = (m_br.group(1).split(",")[0].strip().lstrip("%") if m_br
                 else _attr(rest, "true_computation") or "")
        walk(first, depth + 1)
      elif op == "call":
        walk(_attr(rest, "to_apply") or "", depth + 1)
      elif op == "fusion":
        callee = _attr(rest, "calls") or ""
        out.append({"name": name, "kind": "gemm" if c.has_dot(callee) else "fusion",
                    "shape": shape, "ops": " ".join(_fused_ops(c, callee))})
      elif op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        kname = re.search(r'"name":"([^"]*)"', rest)
        out.append({"name": name, "kind": "custom-call", "shape": shape,
                    "ops": " ".join(x.group(1) for x in (target, kname) if x)})
      else:
        out.append({"name": name, "kind": op, "shape": shape, "ops": op})
  walk(c.entry, 0)
  return out


if __name__ == "__main__":
  # python bench/probes/hlo_stats.py < module.txt            kernel counts (JSON)
  # python bench/probes/hlo_stats.py --launches N < module.txt  the first N launches
  import sys
  text = sys.stdin.read()
  if len(sys.argv) > 2 and sys.argv[1] == "--launches":
    for i, row in enumerate(launches(text)[:int(sys.argv[2])]):
      print(f"{i:4d} {row['kind']:11s} {row['name']:36s} {row['shape'][:40]:40s} "
            f"{row['ops'][:160]}")
  else:
    print(json.dumps(kernel_counts(text), indent=1))
