"""Config-level rules of ``student_init`` (distillation from a checkpoint) and of compress ``recovery``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config.compress import CompressConfig
from cluster.config.distill import DistillConfig
from cluster.config.model import preset
from cluster.model import Transformer

PRUNED = {"name": "p", "prune": {"method": "structured", "sparsity": 0.5, "head_sparsity": 0.5}}


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "init"
    Transformer(preset("tiny", d_ff=96, max_seq_len=64)).init_weights(0).save_pretrained(d)
    return d


def test_student_init_dir_is_the_architecture(ckpt: Path) -> None:
    c = DistillConfig(student_init=str(ckpt), seq_len=64)
    assert c.student_model() == preset("tiny", d_ff=96, max_seq_len=64)
    with pytest.raises(ValueError, match=r"seq_len \(128\) > the student's max_seq_len \(64\)"):
        DistillConfig(student_init=str(ckpt), seq_len=128)


def test_student_init_ref_is_checked_after_resolving() -> None:
    c = DistillConfig(student_init="student@latest", seq_len=4096)  # no architecture yet: make_plan checks it
    with pytest.raises(ValueError, match="resolved by train.distill.job.make_plan"):
        c.student_model()


def test_recovery_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="recovery.enabled needs a variant with structured pruning"):
        CompressConfig(variants=[{"name": "m", "prune": {"method": "magnitude"}}], recovery={"enabled": True})
    with pytest.raises(ValueError, match="recovery.distill may not set student_init, teacher"):
        CompressConfig(
            variants=[PRUNED], recovery={"enabled": True, "distill": {"teacher": "x", "student_init": "y"}}
        )
    with pytest.raises(ValueError, match=r"recovery: distill.nosuchfield: Extra inputs are not permitted"):
        CompressConfig(variants=[PRUNED], recovery={"enabled": True, "distill": {"nosuchfield": 1}})
    with pytest.raises(ValueError, match=r"recovery: distill: warmup_steps \(10\) must be < steps \(5\)"):
        CompressConfig(variants=[PRUNED], recovery={"enabled": True, "steps": 5})
    with pytest.raises(ValueError, match="p-recovered clash"):
        CompressConfig(
            variants=[PRUNED, {"name": "p-recovered", "quant": {"scheme": "int8"}}],
            recovery={"enabled": True},
        )
    CompressConfig(
        variants=[{"name": "m", "prune": {"method": "magnitude"}}]
    )  # recovery off: no pruning needed


def test_recovery_distill_config_uses_the_source_and_the_pruned_model() -> None:
    c = CompressConfig(
        variants=[PRUNED], recovery={"enabled": True, "steps": 50, "distill": {"zero_stage": 2}}
    )
    d = c.recovery_distill(
        teacher="student:3", student_init="/tmp/x/init", data=c.data, run_dir="/tmp/x/distill"
    )
    assert (d.teacher, d.student_init, d.steps, d.zero_stage, d.publish) == (
        "student:3",
        "/tmp/x/init",
        50,
        2,
        False,
    )
    assert d.teacher_source == "online" and d.seq_len == c.eval.seq_len and d.eval.teacher is False
