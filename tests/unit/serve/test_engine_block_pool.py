import pytest

from serve.engine.block_pool import BlockPool


def h(i: int) -> bytes:
    return i.to_bytes(32, "little")


def test_allocate_free_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and pool.usage() == 0.75
    pool.touch([a[0]])
    pool.free([a[0]])
    assert pool.num_free == 1
    pool.free(a)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError):
        pool.free([a[1]])
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_lru_evicts_tail_first_and_revives_on_touch():
    pool = BlockPool(6)
    seq1 = pool.allocate(3)
    for i, b in enumerate(seq1):
        pool.cache_block(b, h(i))
    pool.free(reversed(seq1))  # finished request: tail first
    assert [pool.lookup(h(i)) for i in range(3)] == seq1
    # the 3 never-used blocks go first, then seq1's tail, then its middle
    got = pool.allocate(4)
    assert seq1[2] in got and pool.lookup(h(2)) is None
    assert pool.lookup(h(0)) == seq1[0] and pool.lookup(h(1)) == seq1[1]
    pool.touch([seq1[0]])  # prefix hit revives block 0
    pool.allocate(1)
    assert pool.lookup(h(1)) is None and pool.lookup(h(0)) == seq1[0]
    assert pool.num_free == 0 and pool.num_evictions == 2


def test_unhashed_blocks_are_reused_before_cached_ones():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache_block(a, h(1))
    pool.free([a])
    pool.free([b])  # no hash: goes to the front
    assert pool.allocate(1) == [b]
    assert pool.lookup(h(1)) == a


def test_duplicate_hash_not_registered_twice():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, h(5))
    assert not pool.cache_block(b, h(5))
    assert pool.lookup(h(5)) == a
