"""Corpus, tokenizer and token-shard settings (``retort data``; embedded as ``data:`` in training jobs)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator

from cluster.config.base import StrictModel

# 256 byte symbols + <|endoftext|>, <|pad|>, <|im_start|>, <|im_end|>: the smallest byte-level BPE vocab.
MIN_VOCAB_SIZE = 260
# Token ids are stored as uint16 up to this vocab size, as uint32 above it.
UINT16_VOCAB_LIMIT = 65535


class DataConfig(StrictModel):
    sources: list[str] = Field(
        ["stdlib"],
        min_length=1,
        description="Where the text comes from, in order. 'stdlib' = the .py files of the running "
        "interpreter's standard library (no site-packages); otherwise a file, a directory (every "
        "non-binary file below it, hidden ones skipped), or a glob ('data/**/*.txt'). Files ending in "
        ".jsonl hold one JSON object per line, the text in `jsonl_text_field`.",
    )
    jsonl_text_field: str = Field("text", min_length=1, description="JSONL key that holds a document's text.")
    include_tests: bool = Field(
        True,
        description="Include the stdlib's test packages (test/, tests/, idle_test/): ~60% of its ~30 MB.",
    )
    max_docs: int | None = Field(
        None, ge=1, description="Take at most this many documents (in source order)."
    )
    max_bytes: int | None = Field(
        None,
        ge=1,
        description="Stop taking documents once this many bytes of text are taken (the document that "
        "crosses the limit is kept). Caps the corpus for quick presets.",
    )
    val_fraction: float = Field(
        0.02,
        gt=0.0,
        le=0.5,
        description="Share of documents in the validation split, chosen by a hash of each document's "
        "content and `seed` (not by position), so a document keeps its split when others change.",
    )
    vocab_size: int = Field(
        4096,
        le=1_000_000,
        description=f"Byte-level BPE vocabulary size, special tokens included (at least {MIN_VOCAB_SIZE}). "
        f"Token shards are uint16 up to {UINT16_VOCAB_LIMIT}, uint32 above.",
    )
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to become a BPE merge.")
    out_dir: str = Field(
        "~/.retort/data",
        description="Root of prepared data; each corpus+settings lands in <out_dir>/<fingerprint[:16]>/. "
        "'~' and $VARS are expanded.",
    )
    seed: int = Field(0, ge=0, description="Salt of the train/validation split hash.")

    @field_validator("vocab_size")
    @classmethod
    def _vocab_size(cls, v: int) -> int:
        if v < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size {v} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                "(256 byte symbols + 4 special tokens)"
            )
        return v

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s.strip():
                raise ValueError("a source is an empty string")
        return v

    @property
    def out_path(self) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(self.out_dir)))
