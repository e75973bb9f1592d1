"""The block pool: reference counts, the prefix cache, least-recently-used eviction."""

import pytest

from nextword.server.kv_cache import BlockPool, CacheFull, block_keys


def test_keys_chain_over_the_whole_prefix():
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # only full blocks
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    b = block_keys([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert b[0] != a[0] and b[1] != a[1]  # the second block differs because its prefix does
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, start=1, parent=a[0]) == a[1:]


def test_grow_release_and_capacity():
    pool = BlockPool(4, 16)
    blocks = []
    pool.grow(blocks, 33)
    assert len(blocks) == 3 and pool.free_blocks == 1
    with pytest.raises(CacheFull):
        pool.grow([], 17)
    pool.release(blocks)
    assert blocks == [] and pool.free_blocks == 4


def test_prefix_is_shared_then_cached_then_evicted_oldest_first():
    pool = BlockPool(4, 2)
    tokens = [5, 6, 7, 8, 9]
    keys = block_keys(tokens, 2)
    first = []
    pool.grow(first, 5)
    pool.register(first, keys, 0)
    assert pool.cached_blocks == 2
    held = list(first)  # release() empties the list it is given

    second = pool.match(keys)  # shared while the first still holds them
    assert second == held[:2] and pool.free_blocks == 1
    pool.release(first)
    assert pool.free_blocks == 2  # the shared blocks are still held by the second
    pool.release(second)
    assert pool.free_blocks == 4 and pool.cached_blocks == 2  # unreferenced, but still cached

    reused = pool.match(block_keys([5, 6, 0, 0], 2))
    assert reused == held[:1]  # only the first block matches
    pool.release(reused)  # ... and is now the most recently used cached block
    pool.grow([], 6)  # 3 blocks: the 2 never-cached ones, then the least recently used cached one
    assert pool.cached_blocks == 1
    assert pool.match(keys) == held[:1]  # the recently used block survived, its successor was evicted


def test_a_released_partial_block_is_found_by_its_tokens_until_its_slot_is_needed():
    pool = BlockPool(3, 4)
    keys = block_keys([1, 2, 3, 4], 4)
    blocks = []
    pool.grow(blocks, 7)
    pool.register(blocks, keys, 0)
    held = list(blocks)
    pool.release(blocks, (held[1], keys[0], (5, 6, 7)))  # block 1 holds tokens 5, 6, 7 after block 0
    assert pool.free_blocks == 3

    assert pool.match_partial(keys[0], [5, 6, 9]) == (held[1], 2)  # the longest common start
    assert pool.free_blocks == 2  # taken while the caller copies
    pool.release([held[1]])
    assert pool.match_partial(b"other parent", [5, 6, 7]) == (None, 0)
    assert pool.match_partial(keys[0], [8]) == (None, 0)

    pool.grow([], 12)  # every slot is needed: the cached blocks are reused and forgotten
    assert pool.match_partial(keys[0], [5, 6, 7]) == (None, 0) and pool.cached_blocks == 0
