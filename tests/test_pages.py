import pytest

from ssd_jax.engine.pages import PagePool, OutOfPagesError


def test_allocate_and_free_returns_pages():
  bm = PagePool(num_pages=8, page_size=4)
  pages, cached = bm.allocate([1, 2, 3], total_tokens=10)
  assert len(pages) == 3 and cached == 0 and len(set(pages)) == 3
  assert bm.num_free == 5
  bm.free(pages)
  assert bm.num_free == 8


def test_prefix_hit_shares_full_pages_and_recomputes_last_token():
  bm = PagePool(num_pages=16, page_size=4)
  prompt = list(range(10))  # pages [0-3], [4-7] full; the last token is never shared
  a, cached_a = bm.allocate(prompt, total_tokens=14)
  b, cached_b = bm.allocate(prompt + [99], total_tokens=15)
  assert cached_a == 0 and cached_b == 8
  assert b[:2] == a[:2] and set(b[2:]).isdisjoint(a)
  # A prompt that is exactly two pages long shares only the first (last token recomputed).
  c, cached_c = bm.allocate(list(range(8)), total_tokens=9)
  assert cached_c == 4 and c[0] == a[0]


def test_cached_pages_survive_free_and_are_evicted_when_needed():
  bm = PagePool(num_pages=4, page_size=4)
  a, _ = bm.allocate(list(range(9)), total_tokens=9)      # 3 pages, 2 cacheable
  bm.free(a)
  again, cached = bm.allocate(list(range(9)), total_tokens=9)
  assert cached == 8 and again[:2] == a[:2]
  bm.free(again)
  other, cached = bm.allocate([50 + i for i in range(16)], total_tokens=16)  # needs all 4
  assert cached == 0 and len(other) == 4
  bm.free(other)
  _, cached = bm.allocate(list(range(9)), total_tokens=9)
  assert cached == 0  # the old prefix was evicted to make room


def test_exhaustion_is_reported_clearly():
  bm = PagePool(num_pages=4, page_size=4)
  with pytest.raises(OutOfPagesError, match="needs 5 KV pages .* cache has 4"):
    bm.allocate([1], total_tokens=20)
  held, _ = bm.allocate([1], total_tokens=16)
  assert not bm.can_allocate([2], 4)
  with pytest.raises(OutOfPagesError, match="not enough free KV pages"):
    bm.allocate([2], total_tokens=4)
  bm.free(held)
  assert bm.can_allocate([2], 4)


def test_double_free_is_an_error():
  bm = PagePool(num_pages=2, page_size=4)
  pages, _ = bm.allocate([1], 4)
  bm.free(pages)
  with pytest.raises(RuntimeError, match="freed twice"):
    bm.free(pages)


def test_drop_cached_forgets_prefixes():
  bm = PagePool(num_pages=8, page_size=4)
  a, _ = bm.allocate(list(range(9)), total_tokens=9)
  bm.free(a)
  bm.drop_cached()
  assert bm.num_free == 8
  _, cached = bm.allocate(list(range(9)), total_tokens=9)
  assert cached == 0
