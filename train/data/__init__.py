"""Corpus reading, the tokenizer it trains, token shards and packed batches.

``prepare(cfg)`` turns a ``DataConfig`` into a prepared data dir (reused when its fingerprint
matches); ``load_split(dir, split)`` maps a split's tokens; ``train.data.loader.packed_batches``
cuts them into training batches.
"""

from train.data.shards import DataManifest, load_manifest, load_split, prepare

__all__ = ["DataManifest", "load_manifest", "load_split", "prepare"]
