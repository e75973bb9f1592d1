"""Bookkeeping of the paged KV cache: which blocks are free, which belong to which sequence."""

from __future__ import annotations


class CacheFull(Exception):
    """Not enough free blocks right now; the caller waits or retries later."""


class BlockAllocator:
    """A free list over `num_blocks` cache blocks of `block_size` positions each."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def grow(self, blocks: list[int], num_positions: int) -> None:
        """Append blocks to `blocks` until they hold `num_positions` positions (all or nothing)."""
        need = self.blocks_for(num_positions) - len(blocks)
        if need > len(self._free):
            raise CacheFull(f"need {need} KV-cache blocks, {len(self._free)} free")
        for _ in range(max(need, 0)):
            blocks.append(self._free.pop())

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()
