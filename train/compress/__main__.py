"""``python -m train.compress -c FILE [key=value ...]`` (also the Ray job entrypoint)."""

from __future__ import annotations

import sys

from cluster.entry import job_main


def _run(cfg) -> None:
    from train.compress.job import run

    run(cfg)


def main(argv: list[str] | None = None) -> int:
    return job_main("compress", _run, "python -m train.compress", argv)


if __name__ == "__main__":
    sys.exit(main())
