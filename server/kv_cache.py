"""Bookkeeping of the paged KV cache: which blocks are free, who holds them, and the prefix cache.

A block is `block_size` consecutive positions of one sequence. Once a block is full, its keys and values
depend only on the tokens up to its end, so it gets a key: a digest chained over every token up to and
including the block. Another sequence whose prompt starts with the same tokens reuses the block instead of
computing it (the autocomplete case: each keystroke re-sends almost the same prompt). Blocks are reference
counted; a released block that has a key stays cached until its slot is needed (least recently used first).

When a sequence releases its blocks, the last one holding prompt tokens keeps a record of those tokens (behind
its parent key), whatever followed them in the block: a later prompt that shares them copies their keys and
values into a block of its own (`match_partial`) instead of computing them. An editor's next keystroke re-sends its prompt plus a character
or two, so this turns ~10 recomputed tokens a keystroke (half a block on average, plus the new ones) into 1-3.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class CacheFull(Exception):
    """Not enough free blocks right now; the caller waits or retries later."""


def block_keys(tokens: list[int], block_size: int, start: int = 0, parent: bytes = b"") -> list[bytes]:
    """Chained digests of the full blocks of `tokens`, from block index `start` on (`parent`: the key of
    block start - 1). Equal keys mean equal tokens from position 0 to the block's end."""
    keys = []
    for b in range(start, len(tokens) // block_size):
        chunk = np.asarray(tokens[b * block_size : (b + 1) * block_size], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        keys.append(parent)
    return keys


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # never used or evicted: pop() gives low ids first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}  # block -> its prefix key (full blocks only)
        self._block_of: dict[bytes, int] = {}  # prefix key -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self._partial_of: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # block -> (parent key, its tokens)
        self._partials: dict[bytes, set[int]] = {}  # parent key -> released partial blocks after it

    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out now (never used, or cached but unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._block_of)

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def match(self, keys: list[bytes]) -> list[int]:
        """Take a reference on the cached blocks of the longest matching prefix of `keys`."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            self._take(block)
            blocks.append(block)
        return blocks

    def grow(self, blocks: list[int], num_positions: int) -> None:
        """Append fresh blocks to `blocks` until they hold `num_positions` positions (all or nothing)."""
        need = self.blocks_for(num_positions) - len(blocks)
        if need > self.free_blocks:
            raise CacheFull(f"need {need} KV-cache blocks, {self.free_blocks} free")
        for _ in range(max(need, 0)):
            if self._free:
                block = self._free.pop()
            else:  # reuse the least recently used cached block: forget what it held
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            self._refs[block] = 1
            blocks.append(block)

    def register(self, blocks: list[int], keys: list[bytes], start: int) -> None:
        """Record that blocks[start:start + len(keys)] are full and hold the prefixes `keys`."""
        for block, key in zip(blocks[start : start + len(keys)], keys, strict=True):
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key

    def match_partial(self, parent: bytes, tokens: list[int]) -> tuple[int | None, int]:
        """The released partial block after `parent` whose tokens share the longest start with `tokens`, and
        that length (None, 0 if none). The caller copies what it needs, then releases the block."""
        best, best_n = None, 0
        for block in self._partials.get(parent, ()):
            held = self._partial_of[block][1]
            n = 0
            for a, b in zip(held, tokens, strict=False):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = block, n
        if best is not None:
            self._take(best)
        return best, best_n

    def release(self, blocks: list[int], partial: tuple[int, bytes, tuple[int, ...]] | None = None) -> None:
        """Drop one reference on each block; unreferenced blocks become free (or evictable if cached).
        `partial`: (block, parent key, the prompt tokens it holds) of the sequence's last block of prompt."""
        if partial is not None:  # (a block that filled up with generated tokens also keeps its key)
            block, parent, tokens = partial
            self._drop_partial(block)
            self._partial_of[block] = (parent, tokens)
            self._partials.setdefault(parent, set()).add(block)
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of or block in self._partial_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        blocks.clear()

    def _forget(self, block: int) -> None:
        """Drop what the prefix cache knows of `block` (it is about to hold something else)."""
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]
        self._drop_partial(block)

    def _drop_partial(self, block: int) -> None:
        record = self._partial_of.pop(block, None)
        if record is not None:
            siblings = self._partials[record[0]]
            siblings.discard(block)
            if not siblings:
                del self._partials[record[0]]

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
        self._refs[block] += 1
