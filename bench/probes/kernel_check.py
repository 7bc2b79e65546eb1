"""The paged-attention kernel's correctness suite (`kernel_bench.py --check`): the compiled
kernel against the XLA reference on cases that cover every path of its launch plan, and
the helpers that record and print a launch plan (shared with kernel_bench's rows)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.kernels import pallas_attention, reference


def with_merge(plan, merge):
  """The plan as run with `merge` (None: the merge kernel): the merge kernel's fields only
  where that kernel runs."""
  if plan["num_splits"] > 1 and merge == "xla":
    plan = {k: v for k, v in plan.items() if not k.startswith("merge_")}
    plan["merge"] = "xla"
  return plan


def plan_str(p):
  if "error" in p:
    return "plan error"
  s = f"r{p['tile']}x{p['n_tiles']} k{p['block_k']} w{p['num_warps']} st{p['num_stages']} "
  s += f"sp{p['num_splits']}"
  if "merge_rows" in p:
    s += f" m{p['merge_rows']}"
  elif p.get("merge") == "xla":
    s += " mxla"
  return s


# (dtype, Q, Hq, Hkv, head_dim, page_size, splits, extra): extra may set block_k,
# block_rows, num_warps, merge, and ctx (tokens of page table per sequence, default ~700).
def check_cases(which):
  cases = []
  shapes = ((1, 8, 8, 64, 16), (1, 32, 8, 128, 64), (1, 64, 8, 128, 256), (8, 32, 8, 128, 16),
            (8, 16, 2, 64, 64), (24, 32, 8, 128, 64), (24, 8, 8, 64, 16),
            (24, 64, 8, 128, 32), (200, 8, 2, 128, 64))
  for i, shp in enumerate(shapes):
    cases.append(("bfloat16", *shp, (None, 3)[i % 2], {}))
    cases.append(("float32", *shp, (3, None)[i % 2], {}))
  cases.append(("bfloat16", 1, 32, 8, 128, 16, None, dict(block_k=64)))  # gathered pages
  cases.append(("bfloat16", 24, 32, 8, 128, 16, 2, dict(block_k=128)))
  cases.append(("bfloat16", 1, 32, 8, 128, 256, 2, dict(block_k=64)))  # quarter pages
  cases.append(("float32", 8, 16, 2, 64, 64, None, dict(block_k=32)))
  # The merge kernel and the split policy: the most splits (32), a split count that is
  # not a power of two merged in Pallas and in XLA, a short table (auto: no split), the
  # draft's shape (9 rows per query: the merge takes one row per program), and the tile
  # knobs the `tiles` sweep tries on 70b verify / tree.
  new = [
      ("float32", 1, 32, 8, 128, 16, 32, dict(ctx=2100)),
      ("bfloat16", 1, 32, 8, 128, 64, 5, dict(merge="xla")),
      ("bfloat16", 1, 32, 8, 128, 64, 5, {}),
      ("bfloat16", 1, 32, 8, 128, 64, None, dict(ctx=400)),
      ("bfloat16", 1, 9, 3, 64, 64, 3, {}),
      ("float32", 8, 64, 8, 128, 64, None, {}),
      ("bfloat16", 8, 64, 8, 128, 64, None, dict(block_k=128, num_warps=4)),
      ("bfloat16", 24, 64, 8, 128, 64, None, dict(block_rows=64, num_warps=4)),
      ("bfloat16", 24, 64, 8, 128, 64, 2, dict(block_rows=256, block_k=32)),
  ]
  if which == "quick":
    # The default paths the merge kernel and the split policy touch: auto splits for GQA
    # decode (merge of 1 row per program) and for a two-tile 70b tree (16 rows per merge
    # program), 32 splits, 5 splits, a short table (no split), the draft's shape.
    return [cases[3], cases[15]] + new[:1] + new[2:5]
  return cases + new


def check(check_set: str, race_repeats: int, out: dict, out_of_time=lambda: False,
          progress=lambda i, n: f"[{i}/{n}]") -> int:
  """Compiled kernel vs reference: every mode, dtypes, head dims, page sizes, GQA groups,
  ragged limits, shuffled pages, poisoned unused pages and slots, kv_limit == 0 rows.
  Each case's result is appended to out["check"]; returns the number of failures. Split
  cases are called `race_repeats` more times on the same inputs."""
  rng = np.random.default_rng(0)
  cases = check_cases(check_set)
  failures = done = 0
  for n, c in enumerate(cases, 1):
    dtype, nq, hq, hkv, d, ps, splits, extra = c
    extra = dict(extra)
    ctx = extra.pop("ctx", 700)
    tag = (f"{dtype} Q={nq} Hq={hq} Hkv={hkv} D={d} ps={ps} splits={splits} ctx~{ctx} "
           f"{extra}")
    if out_of_time():
      print(f"{progress(n, len(cases))} check skip {tag}: time budget spent", flush=True)
      out.setdefault("check", []).append(dict(case=tag, skipped=True))
      continue
    b, pages_per_seq = 3, max(2, ctx // ps + 1)
    dt = jnp.dtype(dtype)
    num_pages = b * pages_per_seq + 5
    q = rng.standard_normal((b, nq, hq, d)).astype(np.float32)
    k = rng.standard_normal((num_pages, ps, hkv, d)).astype(np.float32)
    v = rng.standard_normal((num_pages, ps, hkv, d)).astype(np.float32)
    pt = rng.permutation(num_pages)[:b * pages_per_seq].reshape(b, pages_per_seq)
    cap = pages_per_seq * ps
    base = np.array([cap, rng.integers(1, cap), 0])
    if nq == 1:
      lim = base[:, None]
    else:
      lim = np.maximum(0, base[:, None] - rng.integers(0, nq, (b, nq)))
      lim[2] = 0
    clean_k, clean_v = k.copy(), v.copy()
    used = np.zeros((num_pages, ps), bool)
    for i in range(b):
      m = int(lim[i].max())
      for p in range(pages_per_seq):
        lo = p * ps
        used[pt[i, p], :max(0, min(ps, m - lo))] = True
    k[~used] = np.nan
    v[~used] = np.nan
    clean_k[~used] = 0.0
    clean_v[~used] = 0.0
    args = [jnp.asarray(x, dt) for x in (q, k, v)] + [jnp.asarray(pt, jnp.int32),
                                                       jnp.asarray(lim, jnp.int32)]
    ref_args = [jnp.asarray(x, dt) for x in (q, clean_k, clean_v)] + args[3:]
    scale = d ** -0.5
    plan = pallas_attention.launch_plan(
        q.shape, k.shape, pages_per_seq, dt, num_splits=splits,
        interpret=jax.default_backend() != "gpu",
        **{key: val for key, val in extra.items() if key != "merge"})
    plan = with_merge(plan, extra.get("merge"))
    try:
      attn = jax.jit(functools.partial(pallas_attention.paged_attention, scale=scale,
                                       num_splits=splits, **extra))
      o, lse = attn(*args)
      with jax.default_matmul_precision("highest"):  # no TF32 in the float32 reference
        ro, rlse = jax.jit(functools.partial(reference.paged_attention, scale=scale))(
            *ref_args)
      o, ro = np.asarray(o, np.float32), np.asarray(ro, np.float32)
      err = np.linalg.norm(o - ro) / np.linalg.norm(ro)
      lse_ok = np.allclose(np.asarray(lse), np.asarray(rlse), rtol=1e-4, atol=1e-3)
      empty_ok = bool(np.all(o[lim == 0] == 0.0))
      tol = 1e-5 if dtype == "float32" else 2e-2
      # Splits run concurrently and are merged afterwards: the same inputs must give
      # bitwise the same outputs every time (a race would move them).
      stable = True
      if plan["num_splits"] > 1:
        for _ in range(race_repeats):
          o2, lse2 = attn(*args)
          stable &= bool(np.array_equal(np.asarray(o2, np.float32), o)
                         and np.array_equal(np.asarray(lse2), np.asarray(lse)))
      ok = err < tol and lse_ok and empty_ok and np.isfinite(o).all() and stable
      out.setdefault("check", []).append(dict(case=tag, ok=bool(ok), rel_err=float(err),
                                               lse_ok=bool(lse_ok), stable=stable, plan=plan))
      print(f"{progress(n, len(cases))} check {'OK  ' if ok else 'FAIL'} {tag} "
            f"[{plan_str(plan)}]: rel err {err:.2e} lse ok {lse_ok} empty rows 0 {empty_ok}"
            f" repeatable {stable}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      ok = False
      out.setdefault("check", []).append(dict(case=tag, ok=False, plan=plan,
                                               error=f"{type(e).__name__}: {str(e)[:300]}"))
      print(f"{progress(n, len(cases))} check FAIL {tag}: {type(e).__name__}: "
            f"{str(e)[:1500]}", flush=True)
    failures += not ok
    done += 1
  print(f"check: {done - failures}/{done} passed ({len(cases) - done} skipped)", flush=True)
  return failures
