"""Chained KV block hashes, identical in every process and on every machine.

A full block's key is ``sha256(parent_hash || token ids as little-endian int32 || extra keys)``.
The first block's parent is 32 zero bytes and its extra keys carry the model identity and the
tenant salt (length-prefixed, so that no two (model, salt) pairs encode alike); later blocks
inherit both through the chain, exactly as vLLM mixes ``cache_salt`` into the first block only.
Python's ``hash()`` is never used: it is salted per process (PYTHONHASHSEED), which would make a
block computed by one replica unfindable by another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

ROOT_PARENT = bytes(32)
HASH_VERSION = b"retort-kv-v1"


def _field(b: bytes) -> bytes:
    return len(b).to_bytes(4, "little") + b


def first_block_extra_keys(model_id: str, salt: str | None) -> bytes:
    """Extra keys of a sequence's first block: format version, model identity, tenant salt."""
    salt_bytes = b"\x00" if salt is None else b"\x01" + salt.encode("utf-8")
    return _field(HASH_VERSION) + _field(model_id.encode("utf-8")) + _field(salt_bytes)


def hash_block(parent: bytes, token_ids: Sequence[int], extra_keys: bytes = b"") -> bytes:
    """One block's 32-byte key. ``token_ids`` must fit int32 (vocab ids always do)."""
    h = hashlib.sha256()
    h.update(parent)
    h.update(np.asarray(token_ids, dtype="<i4").tobytes())
    h.update(_field(extra_keys))
    return h.digest()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    model_id: str,
    salt: str | None = None,
    start: int = 0,
    parent: bytes | None = None,
) -> list[bytes]:
    """Hashes of the full blocks of ``token_ids`` from block index ``start`` on.

    ``parent`` is the hash of block ``start - 1`` (required when ``start > 0``), so callers can
    extend a sequence's hash list incrementally as its tokens grow.
    """
    if start > 0 and parent is None:
        raise ValueError("parent hash required when start > 0")
    out: list[bytes] = []
    prev = parent if parent is not None else ROOT_PARENT
    extra0 = first_block_extra_keys(model_id, salt)
    for i in range(start, len(token_ids) // block_size):
        prev = hash_block(prev, token_ids[i * block_size : (i + 1) * block_size], extra0 if i == 0 else b"")
        out.append(prev)
    return out


def model_identity(config_json: str, kv_dtype: str, block_size: int, weights_fingerprint: str) -> str:
    """A short identity string for a model + KV layout; enters every first-block hash."""
    h = hashlib.sha256()
    for part in (config_json, kv_dtype, str(block_size), weights_fingerprint):
        h.update(_field(part.encode("utf-8")))
    return h.hexdigest()[:32]
