"""Pages of the KV cache: allocation, freeing, and prefix caching by hashed full pages.

The device holds the page pools; this host-side manager decides which page ids a sequence
uses. A full page of prompt tokens is identified by the hash of all tokens up to its end
(a chain hash), so two prompts sharing a prefix share its pages, reference-counted. Pages
of finished sequences that hold a full prefix stay cached until a new allocation needs
them (least recently freed first).
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


class OutOfPagesError(RuntimeError):
  """A request needs more KV pages than the whole cache has."""


def _chain_hash(prev: bytes, tokens) -> bytes:
  h = hashlib.blake2b(prev, digest_size=16)
  h.update(np.asarray(tokens, np.int64).tobytes())
  return h.digest()


class PagePool:
  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
    self.num_pages = num_pages
    self.page_size = page_size
    self.free_pages: collections.deque[int] = collections.deque(range(num_pages))
    self.refcount = [0] * num_pages
    self.page_hash: dict[int, bytes] = {}            # page -> hash of the prefix it ends
    self.cached: dict[bytes, int] = {}                # hash -> page
    # Free pages that still hold a cached prefix, oldest first (evicted on demand).
    self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()

  def pages_for(self, num_tokens: int) -> int:
    return -(-num_tokens // self.page_size)

  @property
  def num_free(self) -> int:
    return len(self.free_pages) + len(self.evictable)

  def _prefix_hashes(self, prompt: list[int]) -> list[bytes]:
    # Only pages strictly before the last prompt token may be shared: the last token is
    # always recomputed so that prefill has a query to produce the first logits from.
    full = (len(prompt) - 1) // self.page_size
    hashes, h = [], b""
    for i in range(full):
      h = _chain_hash(h, prompt[i * self.page_size:(i + 1) * self.page_size])
      hashes.append(h)
    return hashes

  def can_allocate(self, prompt: list[int], total_tokens: int, headroom: int = 0) -> bool:
    """Whether allocate() would succeed now and leave `headroom` pages free."""
    hits = sum(1 for h in self._prefix_hashes(prompt) if h in self.cached)
    return self.pages_for(total_tokens) - hits + headroom <= self.num_free

  def allocate(self, prompt: list[int], total_tokens: int) -> tuple[list[int], int]:
    """Reserve pages for a sequence that will hold `total_tokens` tokens.

    Returns (page ids in logical order, number of prompt tokens already cached).
    Raises OutOfPagesError if the request could never fit; call can_allocate first to
    wait for pages held by running sequences.
    """
    need = self.pages_for(total_tokens)
    if need > self.num_pages:
      raise OutOfPagesError(
          f"a request of {total_tokens} tokens needs {need} KV pages of {self.page_size} "
          f"tokens but the cache has {self.num_pages}; raise num_pages / max_model_len "
          "or shorten the prompt / max_new_tokens")
    if not self.can_allocate(prompt, total_tokens):
      raise OutOfPagesError(f"not enough free KV pages now ({self.num_free} free, "
                            f"{need} needed); wait for running sequences to finish")
    pages: list[int] = []
    cached_tokens = 0
    for h in self._prefix_hashes(prompt):
      page = self.cached.get(h)
      if page is None:
        break
      self._take(page)
      pages.append(page)
      cached_tokens += self.page_size
    hashes = self._prefix_hashes(prompt)
    while len(pages) < need:
      page = self._pop_free()
      i = len(pages)
      if i < len(hashes) and hashes[i] not in self.cached:  # register for later sharing
        self.page_hash[page] = hashes[i]
        self.cached[hashes[i]] = page
      pages.append(page)
    return pages, cached_tokens

  def extend(self, n: int) -> list[int]:
    """n more pages for a running sequence (its tokens past the prompt: never shared)."""
    if n > self.num_free:
      raise OutOfPagesError(f"not enough free KV pages now ({self.num_free} free, {n} needed)")
    return [self._pop_free() for _ in range(n)]

  def free(self, pages: list[int]) -> None:
    for page in pages:
      self.refcount[page] -= 1
      if self.refcount[page] < 0:
        raise RuntimeError(f"page {page} freed twice")
      if self.refcount[page] == 0:
        if page in self.page_hash:
          self.evictable[page] = None
        else:
          self.free_pages.append(page)

  def drop_cached(self) -> None:
    """Forget every cached prefix; pages in use keep their data but are not shared."""
    self.free_pages.extend(self.evictable)
    self.evictable.clear()
    self.cached.clear()
    self.page_hash.clear()

  def _take(self, page: int) -> None:
    if self.refcount[page] == 0:
      self.evictable.pop(page, None)
    self.refcount[page] += 1

  def _pop_free(self) -> int:
    if self.free_pages:
      page = self.free_pages.popleft()
    else:  # evict the least recently freed cached prefix page
      page, _ = self.evictable.popitem(last=False)
      del self.cached[self.page_hash.pop(page)]
    self.refcount[page] = 1
    return page
