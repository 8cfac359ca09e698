"""Every shipped config validates; a bad one gives one clear line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import load_config, schema_for, validate_file

REPO = Path(__file__).resolve().parents[3]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO / "configs")) for p in SHIPPED])
def test_shipped_config_validates(path):
    validate_file(path)


def test_validate_command_all(capsys):
    assert main(["validate"]) == 0
    assert f"{len(SHIPPED)} valid, 0 invalid" in capsys.readouterr().out


def test_validate_bad_file(tmp_path, capsys):
    bad = tmp_path / "data" / "x.yaml"
    bad.parent.mkdir()
    bad.write_text("vocab_size: lots\n")
    assert main(["validate", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "FAIL" in out and "vocab_size" in out and "'lots'" in out


def test_unknown_kind(tmp_path, capsys):
    bad = tmp_path / "nonsense" / "x.yaml"
    bad.parent.mkdir()
    bad.write_text("a: 1\n")
    assert main(["validate", str(bad)]) == 2
    assert "unknown config kind 'nonsense'" in capsys.readouterr().out


def test_help_is_fast_and_light():
    """`retort --help` must not import torch, ray or deepspeed."""
    code = (
        "import sys; from cluster.cli import build_parser; build_parser(); "
        "print(','.join(m for m in ('torch','ray','deepspeed','transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "configs" / "pipeline").glob("*.yaml")))
def test_pipeline_stages_share_their_data(preset):
    """A pipeline's stage configs must read the same corpus/tokenizer, or their fingerprints would differ."""
    pipe = validate_file(REPO / "configs" / "pipeline" / f"{preset}.yaml")
    fps = {}
    for stage in ("data", "teacher", "distill", "compress"):
        spec = getattr(pipe, stage)
        cfg = load_config(REPO / spec.config, schema_for(stage), spec.overrides)
        data = cfg if stage == "data" else cfg.data
        fps[stage] = data.model_dump(exclude={"out_dir"})
    first = fps["data"]
    for stage, d in fps.items():
        assert d == first, f"{preset}: {stage}'s data section differs from the data stage's"
