"""A model of the bookkeeping of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp).

`torch.cuda.max_memory_allocated()` is the peak of the sum of the sizes of the allocator's *allocated blocks*,
not of the tensors' bytes. A block is the request rounded up to 512 bytes, and a block taken from the cache is
split only when the rest is big enough; otherwise the whole cached block is charged. This class replays those
rules on the sizes a fake run allocates and frees (default settings: no `max_split_size_mb`, no
`roundup_power2_divisions`, no expandable segments, one stream, unlimited device memory):
- sizes: < 512 bytes -> 512, else rounded up to a multiple of 512;
- pools: requests of at most 1 MiB use the small pool, larger ones the large pool;
- a request takes the smallest cached free block of its pool that fits (ties: the lowest address);
- none fits: a new segment is reserved: 2 MiB for small requests, 20 MiB for requests under 10 MiB, else
  the request rounded up to 2 MiB;
- the block is split when the rest is >= 512 bytes (small pool) or > 1 MiB (large pool); the rest is cached;
- a freed block merges with free neighbours of its segment.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # largest request served by the small pool
SMALL_BUFFER = 2 << 20  # segment size for small requests
LARGE_BUFFER = 20 << 20  # segment size for requests between 1 and 10 MiB
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(size: int) -> int:
    """The block size of a request of `size` bytes."""
    return MIN_BLOCK if size < MIN_BLOCK else MIN_BLOCK * -(-size // MIN_BLOCK)


def segment_size(size: int) -> int:
    """The bytes reserved from the device when no cached block fits a (rounded) request of `size`."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-size // ROUND_LARGE)


@dataclass(eq=False)
class Block:
    size: int
    address: int
    small: bool
    allocated: bool = False
    prev: "Block | None" = field(default=None, repr=False)
    next: "Block | None" = field(default=None, repr=False)


class CachingAllocatorModel:
    """malloc/free of byte sizes with the CUDA caching allocator's block accounting.

    `allocated` and `peak_allocated` correspond to torch.cuda.memory_allocated / max_memory_allocated,
    `reserved` to memory_reserved (segments are never released: no empty_cache).
    """

    def __init__(self):
        self._free = {True: [], False: []}  # pool (small?) -> sorted [(size, address, id)]
        self._blocks: dict[int, Block] = {}
        self._addresses = itertools.count(0, 1 << 40)  # each segment in its own address range
        self.allocated = 0
        self.peak_allocated = 0
        self.reserved = 0
        self.segments = 0

    def malloc(self, nbytes: int) -> Block | None:
        """A block for a request of `nbytes` (None for 0 bytes, which the allocator never backs)."""
        if nbytes == 0:
            return None
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._take_free(size, small)
        if block is None:
            reserve = segment_size(size)
            block = Block(reserve, next(self._addresses), small)
            self.reserved += reserve
            self.segments += 1
        rest = block.size - size
        if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:
            remainder = Block(rest, block.address + size, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = remainder
            block.next = remainder
            block.size = size
            self._add_free(remainder)
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block | None) -> None:
        if block is None:
            return
        assert block.allocated, "double free"
        block.allocated = False
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove_free(neighbour)
                if neighbour is block.prev:
                    block.address, block.prev = neighbour.address, neighbour.prev
                    if neighbour.prev is not None:
                        neighbour.prev.next = block
                else:
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
                block.size += neighbour.size
        self._add_free(block)

    def reset_peak(self) -> None:
        self.peak_allocated = self.allocated

    # ------------------------------------------------------------------ free lists
    def _add_free(self, block: Block) -> None:
        self._blocks[id(block)] = block
        bisect.insort(self._free[block.small], (block.size, block.address, id(block)))

    def _remove_free(self, block: Block) -> None:
        pool = self._free[block.small]
        del pool[bisect.bisect_left(pool, (block.size, block.address, id(block)))]
        del self._blocks[id(block)]

    def _take_free(self, size: int, small: bool) -> Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            return None
        block = self._blocks.pop(pool.pop(i)[2])
        return block
