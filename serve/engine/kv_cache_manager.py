"""Paged KV cache: the per-layer KV tensors, each sequence's block table, prefix lookup.

Layout per layer (flash-attn's): ``kv[layer]`` is ``(2, num_blocks + 1, block_size, n_kv_heads,
head_dim)`` (the last block is scratch space for padding); index 0 is K, 1 is V. A sequence's token at position ``p`` lives in block
``table[p // block_size]`` at offset ``p % block_size``.

Prefix caching: a sequence's full blocks are keyed by ``serve.engine.hashing`` chained hashes.
At admission the longest run of cached blocks is reused (at least one token is always left to
compute, since sampling needs the last position's logits). After each step, blocks that became
full are registered under their hash. ``export_blocks`` / ``import_blocks`` move blocks by hash
in and out of the pool, which is all a store shared by replicas needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from serve.engine.block_pool import BlockPool
from serve.engine.hashing import block_hashes
from serve.engine.request import Sequence


class KVCacheManager:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        model_id: str,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.block_size = block_size
        self.model_id = model_id
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        # one extra block that is never handed out: padded rows of a CUDA-graph batch write here
        self.scratch_block = num_blocks
        self.kv = [
            torch.zeros(2, num_blocks + 1, block_size, n_kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(n_layers)
        ]
        self.block_tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}
        self.prefix_queries = 0  # tokens looked up at admission
        self.prefix_hits = 0  # of which found in the cache
        # called with (hashes, block ids) of blocks newly registered (e.g. to publish them to a store)
        self.on_blocks_cached: list[Callable[[list[bytes], list[int]], None]] = []

    @staticmethod
    def bytes_per_block(
        block_size: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * n_layers * block_size * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    # -- hashes --------------------------------------------------------------------------------
    def update_hashes(self, seq: Sequence) -> None:
        """Extend ``seq.block_hashes`` to cover every full block of its current tokens."""
        full = seq.num_tokens // self.block_size
        have = len(seq.block_hashes)
        if full > have:
            end = full * self.block_size
            toks = seq.token_slice(0, end)
            seq.block_hashes.extend(
                block_hashes(
                    toks,
                    self.block_size,
                    self.model_id,
                    seq.salt,
                    start=have,
                    parent=seq.block_hashes[-1] if have else None,
                )
            )

    # -- admission / growth --------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of ``seq`` (leaving >= 1 token to compute)."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        out: list[int] = []
        for h in seq.block_hashes[:max_blocks]:
            bid = self.pool.lookup(h)
            if bid is None:
                break
            out.append(bid)
        return out

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``seq``; False (nothing changed) if the
        pool is short. ``cached_blocks`` (admission only) are prefix hits taken before the new tokens."""
        cached = cached_blocks or []
        table = self.block_tables.get(seq.request_id, [])
        total = seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        need = -(-total // self.block_size) - len(table) - len(cached)
        revive = sum(1 for b in cached if self.pool.ref_cnt[b] == 0)
        if need + revive > self.pool.num_free:
            return False
        self.pool.touch(cached)
        table = self.block_tables.setdefault(seq.request_id, table)
        table.extend(cached)
        if need > 0:
            table.extend(self.pool.allocate(need))
        if cached_blocks is not None:
            seq.num_computed_tokens = len(cached) * self.block_size
            self._num_registered[seq.request_id] = len(cached)
            if self.enable_prefix_caching:
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += seq.num_computed_tokens
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that became full now that ``seq.num_computed_tokens`` advanced."""
        if not self.enable_prefix_caching:
            return
        self.update_hashes(seq)
        table = self.block_tables[seq.request_id]
        start = self._num_registered.get(seq.request_id, 0)
        end = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        new_hashes, new_ids = [], []
        for i in range(start, end):
            if self.pool.cache_block(table[i], seq.block_hashes[i]):
                new_hashes.append(seq.block_hashes[i])
                new_ids.append(table[i])
        self._num_registered[seq.request_id] = max(start, end)
        if new_hashes:
            for cb in self.on_blocks_cached:
                cb(new_hashes, new_ids)

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks, tail first (so its tail is evicted before its prefix)."""
        table = self.block_tables.pop(seq.request_id, None)
        self._num_registered.pop(seq.request_id, None)
        if table:
            self.pool.free(reversed(table))

    def usage(self) -> float:
        return self.pool.usage()

    # -- shared-store hooks --------------------------------------------------------------------
    def cached_prefix_length(self, hashes: list[bytes]) -> int:
        """How many leading ``hashes`` are in the pool now."""
        n = 0
        for h in hashes:
            if self.pool.lookup(h) is None:
                break
            n += 1
        return n

    def export_blocks(self, hashes: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the longest cached prefix of ``hashes``, on CPU:
        each ``(n_layers, n, block_size, n_kv_heads, head_dim)``, n <= len(hashes)."""
        n = self.cached_prefix_length(hashes)
        ids = torch.tensor(
            [self.pool.lookup(h) for h in hashes[:n]], dtype=torch.long, device=self.kv[0].device
        )
        k = torch.stack([layer[0].index_select(0, ids) for layer in self.kv]).cpu()
        v = torch.stack([layer[1].index_select(0, ids) for layer in self.kv]).cpu()
        return k, v

    def import_blocks(self, hashes: list[bytes], k: torch.Tensor, v: torch.Tensor) -> int:
        """Put blocks computed elsewhere into the pool as cached, unreferenced blocks.

        ``k``/``v``: ``(n_layers, len(hashes), block_size, n_kv_heads, head_dim)`` in the pool's
        dtype. Hashes already present are skipped; stops early when the pool has no free block.
        Returns the number of blocks imported.
        """
        ref = self.kv[0]
        want = (len(self.kv), len(hashes), *ref.shape[2:])
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want or t.dtype != ref.dtype:
                raise ValueError(
                    f"import_blocks: {name} is {tuple(t.shape)} {t.dtype}, expected {want} {ref.dtype}"
                )
        if not self.enable_prefix_caching:
            return 0
        todo = [i for i, h in enumerate(hashes) if self.pool.lookup(h) is None][: self.pool.num_free]
        if not todo:
            return 0
        ids = self.pool.allocate(len(todo))
        dst = torch.tensor(ids, dtype=torch.long, device=ref.device)
        src = torch.tensor(
            todo, dtype=torch.long, device=k.device
        )  # the connector decodes onto the pool's device
        for layer, cache in enumerate(self.kv):
            cache[0].index_copy_(0, dst, k[layer].index_select(0, src).to(ref.device))
            cache[1].index_copy_(0, dst, v[layer].index_select(0, src).to(ref.device))
        for bid, i in zip(ids, todo, strict=True):
            self.pool.cache_block(bid, hashes[i])
        self.pool.free(reversed(ids))
        return len(ids)
