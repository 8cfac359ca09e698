"""The shared KV store boundary: keys, the self-describing block record, the ``KVStore`` protocol,
an LRU byte-capacity index the in-process and Ray backends share, and store statistics.

A store maps 48-byte keys to opaque ``bytes`` records. The key is ``layout_namespace(...)`` (16
bytes: model identity, KV dtype and block layout) followed by the engine's 32-byte chained block
hash (which already carries the model identity and the tenant salt), so that two models, dtypes
or layouts can never read each other's blocks even if their token ids agree.

A record is one block of every layer, K and V: ``(n_layers, 2, block_size, n_kv_heads,
head_dim)`` in the KV dtype, after a fixed header that repeats the layout, the dtype and the key
and carries a 64-bit checksum of the payload (``payload_checksums``: a plain and a position-weighted
sum of its 32-bit words, modulo 2^64, so it is computed where the block lands — on the GPU for a CUDA
engine, where hashing ~40 MB on the CPU would cost more than recomputing the prefix). ``decode_blocks``
checks all of it, so a truncated, stale, foreign or corrupted record is refused (and the block
recomputed) instead of imported.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

MAGIC = b"RKV3"  # RKV3: int64-word checksums
_HEADER = struct.Struct("<4sB5I48sq")  # magic, dtype code, (L, 2, bs, h, d), key, checksum(payload)
HEADER_BYTES = _HEADER.size
NAMESPACE_BYTES = 16
KEY_BYTES = NAMESPACE_BYTES + 32
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
    torch.int8: 4,
    torch.float8_e4m3fn: 5,
}


class BadBlock(ValueError):
    """A record that does not decode to the block we asked for (wrong key, layout, dtype, size, checksum)."""


@dataclass(frozen=True)
class BlockLayout:
    """Shape and dtype of one block record: ``(n_layers, 2, block_size, n_kv_heads, head_dim)``."""

    n_layers: int
    block_size: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.n_layers, 2, self.block_size, self.n_kv_heads, self.head_dim)

    @property
    def payload_bytes(self) -> int:
        return self.n_layers * 2 * self.block_size * self.n_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def record_bytes(self) -> int:
        return HEADER_BYTES + self.payload_bytes


def layout_namespace(model_id: str, layout: BlockLayout) -> bytes:
    """16 bytes naming (model identity, dtype, block layout); the first part of every key."""
    h = hashlib.sha256()
    for part in (
        b"retort-kv-store-v2",  # v2: RKV3 records (another checksum): old records are not looked up
        model_id.encode(),
        str(layout.dtype).encode(),
        repr(layout.shape).encode(),
    ):
        h.update(len(part).to_bytes(4, "little") + part)
    return h.digest()[:NAMESPACE_BYTES]


def make_keys(namespace: bytes, block_hashes: Sequence[bytes]) -> list[bytes]:
    return [namespace + h for h in block_hashes]


# -- the record codec ---------------------------------------------------------------------------
_WEIGHTS: dict[tuple[torch.device, int], torch.Tensor] = {}


def payload_checksums(raw: torch.Tensor) -> torch.Tensor:
    """``raw`` (n, payload_bytes) uint8 on any device -> (n,) int64 checksums, equal on every device.

    ``sum(w) + 1000003 * sum(i * w)`` over the payload's int64 words ``w`` (products and sums wrap
    modulo 2^64, so the order of a device's reduction does not matter). Catches truncation, flipped
    bits and swapped words; it is an integrity check, not a defence against forgery (the store is
    trusted like the cluster). int64 words, not int32 summed into int64: on a CPU that widening sum
    was most of the time (6.3 MB on this CPU: 5.4 -> 1.4 ms)."""
    words = raw.view(torch.int64)  # payloads are whole blocks: a multiple of 8 bytes (K and V, head_dim >= 4)
    key = (words.device, words.shape[1])
    w = _WEIGHTS.get(key)
    if w is None:
        w = _WEIGHTS[key] = torch.arange(1, words.shape[1] + 1, dtype=torch.int64, device=words.device)
    return words.sum(1) + 1000003 * (words * w).sum(1)


def encode_blocks(
    layout: BlockLayout, keys: Sequence[bytes], k: torch.Tensor, v: torch.Tensor
) -> list[bytes]:
    """``k``, ``v``: ``(n_layers, n, block_size, n_kv_heads, head_dim)`` on CPU -> n records."""
    n = len(keys)
    want = (layout.n_layers, n, layout.block_size, layout.n_kv_heads, layout.head_dim)
    if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != layout.dtype or v.dtype != layout.dtype:
        raise ValueError(f"encode_blocks: got k {tuple(k.shape)} {k.dtype}, expected {want} {layout.dtype}")
    both = torch.stack([k, v], dim=2).transpose(0, 1).contiguous()  # (n, L, 2, bs, h, d)
    raw = both.reshape(n, -1).view(torch.uint8)  # (n, payload_bytes)
    sums = payload_checksums(raw).tolist()
    code = DTYPE_CODES[layout.dtype]
    return [
        _HEADER.pack(MAGIC, code, *layout.shape, key, sums[i]) + raw[i].numpy().tobytes()
        for i, key in enumerate(keys)
    ]


def check_record(layout: BlockLayout, key: bytes, record: Any) -> tuple[memoryview, int]:
    """Verify one record's size and header against the block we asked for; returns its payload (no
    copy) and the checksum the payload must have (``decode_blocks`` checks it, batched)."""
    if not isinstance(record, (bytes, bytearray, memoryview)):
        raise BadBlock(f"record is {type(record).__name__}, not bytes")
    mv = memoryview(record)
    if len(mv) != layout.record_bytes:
        raise BadBlock(f"record is {len(mv)} bytes, expected {layout.record_bytes}")
    magic, code, L, two, bs, h, d, echo, checksum = _HEADER.unpack_from(mv)
    if magic != MAGIC or code != DTYPE_CODES[layout.dtype] or (L, two, bs, h, d) != layout.shape:
        raise BadBlock(
            f"record header {magic!r} dtype {code} shape {(L, two, bs, h, d)} does not match {layout}"
        )
    if echo != key:
        raise BadBlock("record was stored under another key")
    return mv[HEADER_BYTES:], checksum


def decode_blocks(
    layout: BlockLayout,
    keys: Sequence[bytes],
    records: Sequence[Any],
    device: torch.device | str | None = None,
    staging: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Records -> ``k``, ``v`` each ``(n_layers, n, block_size, n_kv_heads, head_dim)`` on ``device``
    (default CPU): headers checked here, payloads gathered into one (pinned, for CUDA) buffer, moved in
    one copy, and their checksums verified on ``device`` before anything is returned. ``staging``: a
    pinned uint8 buffer to gather into (CUDA; the caller's, reused: pinning 38 MB anew costs
    milliseconds); it is free again when this returns (the checksum check waits for the copy).

    Raises ``BadBlock`` naming the first record that fails verification."""
    n = len(keys)
    device = torch.device(device or "cpu")
    # CUDA: gather the payloads into pinned host memory, then one DMA (measured on an H200 for 64 blocks,
    # 37.7 MB: 4.5 ms; one pageable copy per payload straight into device memory: 10.2 ms)
    need = n * layout.payload_bytes
    if device.type == "cuda" and staging is not None and staging.numel() >= need:
        buf = staging[:need].view(n, layout.payload_bytes)
    else:
        buf = torch.empty(n, layout.payload_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    want = []
    with warnings.catch_warnings():  # read-only buffers: we only read them (copied into buf)
        warnings.simplefilter("ignore", UserWarning)
        for i, (key, rec) in enumerate(zip(keys, records, strict=True)):
            payload, checksum = check_record(layout, key, rec)
            buf[i].copy_(torch.frombuffer(payload, dtype=torch.uint8))
            want.append(checksum)
    buf = buf.to(device, non_blocking=True)
    bad = (
        payload_checksums(buf) != torch.tensor(want, dtype=torch.int64).to(device, non_blocking=True)
    ).nonzero()
    if len(bad):
        raise BadBlock(f"record {int(bad[0])} of {n}: payload checksum mismatch")
    blocks = buf.view(layout.dtype).reshape(n, *layout.shape)  # (n, L, 2, bs, h, d)
    return blocks[:, :, 0].transpose(0, 1), blocks[:, :, 1].transpose(0, 1)


# -- the protocol -------------------------------------------------------------------------------
@dataclass
class StoreStats:
    backend: str
    capacity_bytes: int
    used_bytes: int = 0
    num_blocks: int = 0
    hits: int = 0  # blocks found by get
    misses: int = 0  # blocks asked for and not found
    puts: int = 0  # blocks stored
    bytes_in: int = 0
    bytes_out: int = 0
    evictions: int = 0
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class KVStore(Protocol):
    """A byte-capacity, LRU key -> record store shared by replicas. Every call is batched."""

    name: str
    capacity_bytes: int

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        """Records for ``keys`` (None where absent), in order; refreshes their LRU position."""
        ...

    def put(self, items: list[tuple[bytes, bytes]]) -> bool | None:
        """Store records, evicting least recently used ones past the capacity. False: the batch
        was dropped (a store that is down); None or True: taken."""
        ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...


class LRUIndex:
    """key -> (value, nbytes) with a byte capacity; least recently used first out. Thread-safe.

    ``value`` is whatever the backend keeps (bytes, or a Ray ObjectRef); ``put`` returns the
    values evicted so the caller can release them."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.evictions = 0
        self._items: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, keys: Sequence[bytes]) -> list[Any | None]:
        out: list[Any | None] = []
        with self._lock:
            for key in keys:
                item = self._items.get(key)
                if item is None:
                    out.append(None)
                else:
                    self._items.move_to_end(key)
                    out.append(item[0])
        return out

    def put(self, key: bytes, value: Any, nbytes: int) -> list[Any]:
        if nbytes > self.capacity_bytes:
            return [value]  # never fits: dropped at once
        evicted = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used_bytes -= old[1]
            self._items[key] = (value, nbytes)
            self.used_bytes += nbytes
            while self.used_bytes > self.capacity_bytes:
                _, (val, size) = self._items.popitem(last=False)
                self.used_bytes -= size
                self.evictions += 1
                evicted.append(val)
        return evicted

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used_bytes = 0
