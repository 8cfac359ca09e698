"""``python -m train.data -c configs/data/tiny.yaml [key=value ...]``: corpus -> tokenizer -> shards.

Prints a summary, then the manifest path as the last stdout line (scripts read it).
"""

from __future__ import annotations

import sys
import time

from cluster.config.data import DataConfig
from cluster.entry import job_main


def run(cfg: DataConfig) -> None:
    from train.data import prepare

    t0 = time.perf_counter()
    m = prepare(cfg)
    took = time.perf_counter() - t0
    stats = m.raw["stats"]
    splits = ", ".join(f"{s} {n:,} tokens" for s, n in m.n_tokens.items())
    print(
        f"data {m.fingerprint[:16]}: {splits}; vocab {m.vocab_size} ({m.dtype}); "
        f"{stats['tokens_per_byte']} tokens/byte; tokenizer sha256 {m.tokenizer_sha256[:12]}; {took:.2f}s"
    )
    print(m.path, flush=True)


def main(argv: list[str] | None = None) -> int:
    return job_main("data", run, "python -m train.data", argv)


if __name__ == "__main__":
    sys.exit(main())
