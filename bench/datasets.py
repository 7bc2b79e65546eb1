"""The prompts a benchmark runs: the offline prompt sets of ssd_jax/data/prompts.py, turned
into workloads (text, or exactly --prompt_len token ids).

prompts.py is stdlib-only and is loaded here by file path, without importing the ssd_jax
package (which imports JAX): the PyTorch peer uses these prompts in a process that must
not start JAX.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

from bench.errors import BenchError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_prompt_sets():
  key = "_ssd_jax_prompts"  # one copy per process, whoever loads it first
  if key not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        key, os.path.join(_ROOT, "ssd_jax", "data", "prompts.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
  return sys.modules[key]


prompt_sets = _load_prompt_sets()


@dataclasses.dataclass
class Workload:
  name: str
  prompts: list           # str or list[int]
  chat: bool
  info: dict


def build_workloads(names, numseqs: int, chat_template: str = "auto", log=print) -> list:
  """One Workload per prompt set; with several sets an unavailable one is skipped, loudly.
  chat_template: auto (the set's kind) | on | off."""
  out = []
  for name in names:
    try:
      ps = prompt_sets.load(name, numseqs)
    except prompt_sets.DatasetUnavailable as e:
      if len(names) > 1:
        log(f"[bench] WARNING: skipping dataset {name}: {e}")
        continue
      raise BenchError(str(e)) from None
    chat = {"auto": ps.chat, "on": True, "off": False}[chat_template]
    out.append(Workload(name, list(ps.prompts), chat, ps.describe()))
  if not out:
    raise BenchError("no dataset could be loaded")
  return out


def fixed_length_ids(prompt: str, length: int, tokenizer, vocab_size: int) -> list[int]:
  """Exactly `length` token ids for `prompt`: the tokenizer's ids repeated or cut, or
  without a tokenizer (random-weight checkpoints) ids derived from the text's bytes."""
  if tokenizer is None:
    return prompt_sets.synthetic_token_ids(prompt, length, vocab_size)
  ids = list(tokenizer.encode(prompt, add_special_tokens=False)) or [1]
  return (ids * -(-length // len(ids)))[:length]


def fix_lengths(workloads: list, length: int, tokenizer, vocab_size: int) -> None:
  """Turn every prompt of every workload into exactly `length` token ids (in place)."""
  for w in workloads:
    w.prompts = [fixed_length_ids(p, length, tokenizer, vocab_size) for p in w.prompts]
    w.chat = False
    w.info = dict(w.info, prompt_len=length,
                  tokenization="tokenizer" if tokenizer is not None else
                  "synthetic ids from the text's bytes (no tokenizer)")
