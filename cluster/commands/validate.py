"""``retort validate [PATH...]``: validate config files (all of ``configs/`` by default)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate config files (all of configs/ by default)")
    p.add_argument("paths", nargs="*", help="YAML files or folders (default: configs/)")
    p.set_defaults(handler=run)


def collect(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths or ["configs"]:
        p = Path(raw)
        if p.is_dir():
            files += sorted(p.rglob("*.yaml")) + sorted(p.rglob("*.yml"))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    if not files:
        raise ConfigError(f"no YAML files under {', '.join(paths or ['configs'])}")
    return files


def run(args: argparse.Namespace) -> int:
    from cluster.config import validate_file

    bad = 0
    files = collect(args.paths)
    for f in files:
        try:
            validate_file(f)
            print(f"ok    {f}")
        except ConfigError as e:
            bad += 1
            print(f"FAIL  {e}")
    print(f"{len(files) - bad} valid, {bad} invalid")
    return 2 if bad else 0
