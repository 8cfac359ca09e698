"""train.bench: the demo's recipe, its table and its command line (the full run is the benchmark itself)."""

from __future__ import annotations

from cluster.config import load_config, schema_for
from train import bench


def test_bad_override_is_one_line_exit_2(capsys):
    assert bench.cli(["steps=20"]) == 2  # warmup_steps (20) must be < steps: refused before any training
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: configs/distill/small.yaml")


def test_table_prints_the_command_goals_and_times(capsys):
    dcfg = load_config(bench.DISTILL_CONFIG, schema_for("distill"), [])
    kd = dict(
        val_ppl=150.0,
        teacher_val_ppl=125.0,
        params=1_262_720,
        teacher_params=6_524_160,
        param_ratio=1_262_720 / 6_524_160,
        retention=125 / 150,
        eval_tokens=131072,
        eval_seq_len=128,
    )
    scratch = dict(val_ppl=190.0)
    modes = {"zero-1": {"train_tokens_per_s": 4000.0}, "pipeline": {"train_tokens_per_s": 3000.0}}
    times = {"teacher": {"wall_s": 300.0, "cpu_s": 580.0}, "topk": {"wall_s": 60.0, "cpu_s": 110.0, "k": 32}}
    bench.print_table(kd, scratch, modes, dcfg, "teacher:1", 10, times, ["--quick"])
    out = capsys.readouterr().out
    assert "$ python -m train.bench --quick" in out
    assert (
        "| (a) held-out ppl: KD student vs same student from scratch | 150 | 190 | 0.789 | <= 0.90 OK |"
        in out
    )
    assert "| 150 | 125 | 1.200 | <= 1.30 at <= 0.25x params OK |" in out
    assert "| (c) tokens/s pipeline (2 workers, 10 steps) | 3,000 | 4,000 (zero-1) | 0.75 | - |" in out
    assert "6400 steps" not in out and "400 steps x 16 x 128 = 819,200 tokens" in out
    assert "top-32 cache" in out and "teacher 300 s (580 CPU-s in this process)" in out
    bench.print_table({**kd, "val_ppl": 170.0}, scratch, modes, dcfg, "teacher:1", 10, times, [])
    out = capsys.readouterr().out
    assert "0.895 | <= 0.90 OK" in out and "1.360 | <= 1.30 at <= 0.25x params MISSED" in out
