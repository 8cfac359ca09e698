"""Pipeline state: per stage, the fingerprint of its inputs and the outputs it produced.

A stage whose fingerprint matches and whose outputs still exist (registry refs verify, files
exist) is skipped, so a re-run after a failure resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class PipelineState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stages: dict[str, dict[str, Any]] = {}
        if path.is_file():
            self.stages = json.loads(path.read_text()).get("stages", {})

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.stages.get(stage)

    def record(self, stage: str, fp: str, outputs: dict[str, Any], seconds: float) -> None:
        self.stages[stage] = {"fingerprint": fp, "outputs": outputs, "seconds": round(seconds, 1)}
        self.save()

    def forget(self, stage: str) -> None:
        self.stages.pop(stage, None)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state.")
        with os.fdopen(fd, "w") as fh:
            json.dump({"stages": self.stages}, fh, indent=2, sort_keys=True)
        os.replace(tmp, self.path)
