"""The paged KV block pool: reference counts, a free queue that doubles as the LRU of cached
blocks, and the hash -> block map of the prefix cache.

Free blocks sit in one ordered queue; allocation pops from its front. A block that still holds a
cached (hashed) full block keeps its hash while it waits in the queue, so a later request can
revive it (``touch``) until allocation evicts it. Blocks without a hash go to the front (they are
worthless), cached ones to the back: eviction is least-recently-freed first among cached blocks.
Callers free a finished sequence's blocks tail-first so that its last blocks are evicted first and
its shared prefix survives longest (vLLM's policy).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.num_evictions = 0

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (unreferenced, cached or not)."""
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the front of the free queue (evicting their cached hashes)."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            bid, _ = self.free_queue.popitem(last=False)
            self._evict(bid)
            self.ref_cnt[bid] = 1
            out.append(bid)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); revives them from the free queue."""
        for bid in block_ids:
            if self.ref_cnt[bid] == 0:
                del self.free_queue[bid]
            self.ref_cnt[bid] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in the order given (pass tail-first)."""
        for bid in block_ids:
            self.ref_cnt[bid] -= 1
            if self.ref_cnt[bid] < 0:
                raise RuntimeError(f"KV block {bid} freed more often than referenced")
            if self.ref_cnt[bid] == 0:
                self.free_queue[bid] = None
                if self.block_hash[bid] is None:
                    self.free_queue.move_to_end(bid, last=False)

    # -- prefix cache --------------------------------------------------------------------------
    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Register a full block under its hash; False when another block already holds it."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return False
        if block_hash in self.cached:
            return False
        self.block_hash[block_id] = block_hash
        self.cached[block_hash] = block_id
        return True

    def _evict(self, bid: int) -> None:
        h = self.block_hash[bid]
        if h is not None:
            self.block_hash[bid] = None
            if self.cached.get(h) == bid:
                del self.cached[h]
            self.num_evictions += 1

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash whose block is unreferenced (e.g. after weights changed)."""
        for bid in list(self.free_queue):
            self._evict(bid)
            self.free_queue.move_to_end(bid, last=False)
