r"""A model of AR / SD / SSD decode speed from traces and step times (issue 17, point 3).

Why a model: the settings SSD is built for (a 70B target tensor-parallel on 4 GPUs, a 1B
draft on a fifth; or 8B + 1B on 1 + 1) need machines that are lent only sometimes. So the
tokens/s of each method is computed from two things we can measure separately — how many
tokens a round commits and how often SSD's cache misses (bench/traces.py, real weights),
and how long each program of a round takes (bench/probes/step_programs.py, real shapes) —
and the same arithmetic is checked against every end-to-end run the hardware allows.

Per row of the batch, per round (B rows, K draft tokens, M = sum(fan-out) branches):

  AR   tokens 1                         time ar_step(B)
  SD   tokens 1 + E[accepted]           time verify(B, K+1) + K * draft_step(B)
  SSD  tokens 1 + E[accepted]           time lookup + max(verify(B, K+1) + 2 * xfer,
                                                        glue(B, K+1) + K * tree(B, M))
                                             + [jit] P(some row missed) * K * draft_step(B)
       (draft on the target's GPU: no overlap, lookup + verify + glue + K * tree + fallback)

tokens/s = B * tokens / time (steady state: every row live every round, as continuous
batching keeps it; a measured wave's tail, where finished rows idle, is corrected for in
validation by the trace's tokens per *batch* round).

Assumptions (each one stated again in bench/RESULTS.md):

 A1. Acceptance and hits are per row and do not depend on the batch (rows are independent
     sequences; the engine's output per row does not depend on its neighbours, the
     exactness tests check that). For batch sizes no trace ran at, P(some row missed) =
     1 - h^B with h the per-row hit rate (independent rows; an upper bound if misses
     cluster).
 A2. SSD's critical path: the target cannot verify before the lookup answers (it needs the
     speculation), and the draft builds the next cache after the lookup, on its own GPU,
     while the target verifies. A hit round therefore costs lookup + max(verify + the two
     transfers, build). (The issue writes max(verify, lookup + build) + transfers; the
     difference is the lookup's place, ~0.1-0.3 ms.) The jit fallback drafts K steps for
     the whole batch when any row missed (ssd.py: one loop of 0 or K trips); fast costs
     nothing and its trace shows how little its speculation accepts.
 A3. Step times: a measured time at the exact (program, batch, query tokens) is used as it
     is. Otherwise the program's batch-1 anchor is extended by a roofline:
        t(n) = c0 + max(bytes / BW, 2 * params * n / FLOPS) + n_allreduce * t_allreduce(n)
     with n = batch x query tokens (at least 8 rows: the engine pads, min_step_rows), c0
     calibrated so that t(anchor) = the measured anchor, BW = 4.49 TB/s (the H200's
     measured read ceiling) and FLOPS = 550 TFLOP/s (0.7 of the ~790 TFLOP/s bf16 GEMM
     rate measured on these machines: an assumption for GEMMs of these shapes). KV reads
     are left out (128-256-token contexts: < 3% of an 8B step at batch 32).
 A4. A tensor-parallel target (70B over 4 GPUs) is one GPU's shard: 1/4 of every weight,
     80 layers (bench/step_times: its anchor is the 40-layer 70B-shape step measured on
     one H200, scaled per layer and per byte, see `tp_shard`), plus 2 all-reduces per layer
     of B x q x hidden bf16 values, each bounded at 20 us + bytes / 300 GB/s (not measured:
     only one GPU is lent; NCCL-style latency on NVLink for small messages is 10-30 us).
 A5. Transfers between meshes: 0.09 ms each way (FACTS.md: jax.device_put GPU to GPU, a
     few bytes); lookup 0.2 ms on a hit (a gather; bounded, not measured alone).
 A6. No host time beyond what the single-program timings include (they are measured
     queued back to back, so the host's dispatch overlaps the device as it does in the
     engine's lagged loop).

Times are in ms, rates in tokens/s.
"""

from __future__ import annotations

import dataclasses
import json

READ_BW = 4.49e12        # bytes/s, measured read ceiling of one H200 (RESULTS.md, 2026-12-02)
FLOPS = 550e12           # A3: effective bf16 GEMM rate
XFER_MS = 0.09           # A5
LOOKUP_MS = 0.2          # A5
ALLREDUCE_US = 20.0      # A4: latency part
ALLREDUCE_BW = 300e9     # A4: bytes/s for the bandwidth part
MIN_ROWS = 8             # the engine pads a step to at least 8 rows on GPU


@dataclasses.dataclass
class ModelShape:
  """What a step of one model (or one GPU's shard of it) must read and compute."""
  name: str
  params: float            # parameters multiplied per token (embedding gather excluded)
  bytes: float             # bytes read per step (bf16 weights, embedding gather excluded)
  layers: int
  hidden: int
  allreduces: int = 0      # per step (tensor parallel: 2 per layer)
  anchors: dict = dataclasses.field(default_factory=dict)  # program -> {"q", "ms"} at batch 1
  measured: dict = dataclasses.field(default_factory=dict)  # "program|batch|q" -> ms
  # False for a TP shard timed alone on one GPU (bench/probes/step_grid.py): its measured
  # times lack the all-reduces, which the model then adds (A4)
  measured_has_allreduce: bool = True
  # program -> factor: "what if this step were faster" (bench/headline_report.py break-even)
  scale: dict = dataclasses.field(default_factory=dict)


def allreduce_ms(shape: ModelShape, n_tokens: int) -> float:
  if not shape.allreduces:
    return 0.0
  msg = n_tokens * shape.hidden * 2
  return shape.allreduces * (ALLREDUCE_US * 1e-3 + 1e3 * msg / ALLREDUCE_BW)


def _core_ms(shape: ModelShape, n_tokens: int) -> float:
  n = max(n_tokens, MIN_ROWS)
  return 1e3 * max(shape.bytes / READ_BW, 2 * shape.params * n / FLOPS)


def step_ms(shape: ModelShape, program: str, batch: int, q: int) -> float:
  """One program's time (A3): measured if there is a measurement, else the anchor's
  fixed part + the roofline at this many tokens + the all-reduces (x shape.scale)."""
  return shape.scale.get(program, 1.0) * _step_ms(shape, program, batch, q)


def _step_ms(shape: ModelShape, program: str, batch: int, q: int) -> float:
  key = f"{program}|{batch}|{q}"
  if key in shape.measured:
    extra = 0.0 if shape.measured_has_allreduce else allreduce_ms(shape, batch * q)
    return shape.measured[key] + extra
  a = shape.anchors[program]
  c0 = a["ms"] - _core_ms(shape, a["q"]) - (allreduce_ms(shape, a["q"])
                                            if shape.measured_has_allreduce else 0.0)
  n = batch * q
  return c0 + _core_ms(shape, n) + allreduce_ms(shape, n)


def load_shapes(path: str) -> dict[str, ModelShape]:
  with open(path) as fh:
    d = json.load(fh)
  return {name: ModelShape(name=name, **{k: v for k, v in m.items() if not k.startswith("_")})
          for name, m in d["models"].items()}


# -- tokens per round ----------------------------------------------------------------------
def tokens_per_round_iid(alpha: float, k: int) -> float:
  """Committed tokens per round when each draft token is accepted with probability alpha
  independently (the textbook SD model): 1 + alpha + ... + alpha^K."""
  if alpha >= 1.0:
    return k + 1.0
  return (1 - alpha ** (k + 1)) / (1 - alpha)


def alpha_from_tokens(tokens: float, k: int) -> float:
  """The i.i.d. acceptance rate that gives `tokens` per round at this K (bisection)."""
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    if tokens_per_round_iid(mid, k) < tokens:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


@dataclasses.dataclass
class Stats:
  """What a trace says about one (method, K, fan-out, fallback): per row-round means."""
  tokens_per_round: float
  hit_rate: float | None = None       # SSD
  p_any_miss: dict | None = None      # batch -> measured P(some row missed); else A1
  source: str = ""

  def any_miss(self, batch: int) -> float:
    if self.hit_rate is None:
      return 0.0
    if self.p_any_miss and str(batch) in self.p_any_miss:
      return self.p_any_miss[str(batch)]
    return 1.0 - self.hit_rate ** batch


# -- time per round --------------------------------------------------------------------------
def round_ms(method: str, target: ModelShape, draft: ModelShape | None, batch: int,
             k: int = 7, m: int = 24, fallback: str = "jit", p_miss: float = 0.0,
             split: bool = True) -> dict:
  """Time of one round of the whole batch and its parts (ms)."""
  if method == "ar":
    t = step_ms(target, "target_ar_step", batch, 1)
    return {"round_ms": t, "verify_ms": t}
  verify = step_ms(target, "target_verify", batch, k + 1)
  dstep = step_ms(draft, "draft_step", batch, 1)
  if method == "sd":
    return {"round_ms": verify + k * dstep, "verify_ms": verify, "draft_ms": k * dstep}
  build = step_ms(draft, "draft_glue", batch, k + 1) + k * step_ms(draft, "draft_tree_step",
                                                                 batch, m)
  fb = p_miss * k * dstep if fallback == "jit" else 0.0
  if split:
    hit = LOOKUP_MS + max(verify + 2 * XFER_MS, build)
  else:  # one GPU for both: nothing overlaps
    hit = LOOKUP_MS + verify + build
  return {"round_ms": hit + fb, "hit_round_ms": hit, "verify_ms": verify, "build_ms": build,
          "fallback_ms": fb, "draft_hidden": build <= verify + 2 * XFER_MS}


def predict(method: str, target: ModelShape, draft: ModelShape | None, batch: int,
            stats: Stats | None = None, k: int = 7, m: int = 24, fallback: str = "jit",
            split: bool = True, tokens_per_batch_round: float | None = None) -> dict:
  """tokens/s of one configuration. tokens_per_batch_round: a measured wave's committed
  tokens per batch round (validation of a run with a tail); else B x per-row tokens."""
  per_row = 1.0 if method == "ar" else stats.tokens_per_round
  p_miss = stats.any_miss(batch) if (method == "ssd" and stats) else 0.0
  r = round_ms(method, target, draft, batch, k, m, fallback, p_miss, split)
  toks = tokens_per_batch_round if tokens_per_batch_round else batch * per_row
  r.update(tokens_per_round=per_row, p_any_miss=p_miss, tok_s=1e3 * toks / r["round_ms"])
  return r


def best_ssd(target, draft, batch, stats_by_cfg: dict, split=True) -> dict | None:
  """The fastest traced SSD configuration at this batch: stats_by_cfg maps
  (k, f, m, fallback) -> Stats."""
  best = None
  for (k, f, m, fb), st in stats_by_cfg.items():
    p = predict("ssd", target, draft, batch, st, k=k, m=m, fallback=fb, split=split)
    p.update(k=k, f=f, fallback=fb, m=m)
    if best is None or p["tok_s"] > best["tok_s"]:
      best = p
  return best


def best_sd(target, draft, batch, stats_by_k: dict) -> dict | None:
  best = None
  for k, st in stats_by_k.items():
    p = predict("sd", target, draft, batch, st, k=k)
    p.update(k=k)
    if best is None or p["tok_s"] > best["tok_s"]:
      best = p
  return best


def verify_needed_for(target, draft, batch, k, m, ratio, sd_stats, ssd_stats, fallback):
  """Break-even question of the report: by how much would the draft's build (glue + K
  tree steps) have to shrink for SSD to reach `ratio` x SD at this batch? Returns the
  build time (ms) SSD's round may cost, or None when even a free build is too slow."""
  sd = predict("sd", target, draft, batch, sd_stats, k=k)
  need_round = ssd_stats.tokens_per_round * batch * 1e3 / (ratio * sd["tok_s"])
  r = round_ms("ssd", target, draft, batch, k, m, fallback, ssd_stats.any_miss(batch))
  floor = LOOKUP_MS + r["verify_ms"] + 2 * XFER_MS + r["fallback_ms"]
  if need_round < floor:
    return None
  return need_round - LOOKUP_MS - r["fallback_ms"]


def ratio_table(alphas, k, hit_rate, target, draft, batch, m=24, fallback="jit"):
  """tokens/s of AR, SD and SSD as the acceptance rate varies (i.i.d. model), at a fixed
  hit rate: where the real pair sits and where another pair would."""
  rows = []
  for a in alphas:
    t = tokens_per_round_iid(a, k)
    st = Stats(tokens_per_round=t, hit_rate=hit_rate)
    ar = predict("ar", target, None, batch)
    sd = predict("sd", target, draft, batch, Stats(tokens_per_round=t), k=k)
    ssd = predict("ssd", target, draft, batch, st, k=k, m=m, fallback=fallback)
    rows.append({"alpha": a, "tokens_per_round": t, "ar": ar["tok_s"], "sd": sd["tok_s"],
                 "ssd": ssd["tok_s"]})
  return rows
