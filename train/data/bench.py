"""``python -m train.data.bench [-c configs/data/small.yaml] [key=value ...]``: tokenizer speed.

Trains the config's tokenizer on its corpus (timed), then tokenizes the corpus three ways and
prints a table with the ratio against the baseline measured in the same run:

    per-doc encode      Tokenizer.encode on one document at a time (baseline)
    encode_batch        the batch encoder with offsets (HF's default)
    shard writer        what ``prepare`` does: encode_batch_fast on batches of documents

Nothing is written outside a temp dir; the numbers are the ones ``retort data`` reports.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

from cluster.config import load_config
from cluster.config.data import DataConfig
from cluster.errors import RetortError

T = TypeVar("T")


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench(cfg: DataConfig) -> list[tuple[str, int, float]]:
    from cluster.tokenizer import train_tokenizer
    from train.data.corpus import read_corpus
    from train.data.shards import ENCODE_BATCH_DOCS

    (docs, _), read_s = _timed(lambda: read_corpus(cfg))
    texts = [d.text for d in docs]
    nbytes = sum(d.nbytes for d in docs)
    print(f"corpus: {len(docs)} documents, {nbytes / 1e6:.1f} MB (read in {read_s:.2f}s)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok = train_tokenizer(texts, cfg.vocab_size, tmp, min_frequency=cfg.min_frequency, length=len(texts))
        train_s = time.perf_counter() - t0
    batches = [texts[i : i + ENCODE_BATCH_DOCS] for i in range(0, len(texts), ENCODE_BATCH_DOCS)]
    backend = tok.backend

    def per_doc() -> int:
        return sum(len(backend.encode(t, add_special_tokens=False).ids) for t in texts)

    def batch() -> int:
        return sum(len(e.ids) for b in batches for e in backend.encode_batch(b, add_special_tokens=False))

    def shard_writer() -> int:
        return sum(len(ids) for b in batches for ids in tok.encode_ordinary_batch(b))

    rows = [("train tokenizer", tok.vocab_size, train_s)]
    for name, fn in (("per-doc encode", per_doc), ("encode_batch", batch), ("shard writer", shard_writer)):
        n, s = _timed(fn)
        rows.append((name, n, s))
    _print_table(rows, nbytes)
    return rows


def _print_table(rows: list[tuple[str, int, float]], nbytes: int) -> None:
    base = rows[1][2]
    print(
        f"{'step':<16} {'tokens':>11} {'seconds':>8} {'MB/s':>7} {'Mtok/s':>7} {'tok/byte':>8} {'vs per-doc':>10}"
    )
    name, vocab, s = rows[0]
    print(
        f"{name:<16} {'vocab ' + str(vocab):>11} {s:>8.2f} {nbytes / 1e6 / s:>7.2f} {'':>7} {'':>8} {'':>10}"
    )
    for name, n, s in rows[1:]:
        print(
            f"{name:<16} {n:>11,} {s:>8.2f} {nbytes / 1e6 / s:>7.2f} {n / 1e6 / s:>7.2f} "
            f"{n / nbytes:>8.4f} {base / s:>9.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.data.bench", description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default="configs/data/small.yaml", help="data config (default: small)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_bytes=8000000")
    args = p.parse_args(argv)
    try:
        bench(load_config(args.config, DataConfig, args.overrides))
    except RetortError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
