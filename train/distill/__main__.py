"""``python -m train.distill -c configs/distill/tiny.yaml [key=value ...]``: the Ray Train distillation job.

Also the entrypoint of ``ray job submit --working-dir . -- python -m train.distill -c ...`` and of
``retort distill``. Last stdout line: the published registry ref (``student:3``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from cluster.entry import job_main

    def run(cfg):
        from train.distill.job import run as run_job

        return run_job(cfg)

    return job_main("distill", run, "python -m train.distill", argv)


if __name__ == "__main__":
    sys.exit(main())
