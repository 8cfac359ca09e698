"""``python -m serve.bench`` end to end on a tiny model (CPU): the table, the ratios, the ceiling."""

from __future__ import annotations

import re

import torch

from cluster.config.model import preset
from cluster.model import Transformer
from serve import bench


def test_bench_prints_engine_hf_rows_prefix_ttft_and_the_matmul_ceiling(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--device",
                "cpu",
                "--preset",
                "tiny",
                "--quick",
                "--concurrency",
                "1",
                "2",
                "--prompt-len",
                "16",
                "--output-len",
                "6",
                "--prefix-len",
                "64",
                "--threads",
                "1",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    for system in ("retort engine", "HF default cache", "HF static cache"):
        for c in (1, 2):
            assert re.search(rf"^\| {system} \| {c} \| [\d,]+ \|", text, re.M), (system, c)
    assert "× lower on hit" in text
    ceilings = [
        float(v.replace(",", ""))
        for v in re.findall(r"^\| matmuls alone, c=\d+: .*? \| ([\d,]+) \|", text, re.M)
    ]
    assert len(ceilings) == 2 and all(v > 0 for v in ceilings)
    import json

    res = json.loads(out_json.read_text())
    engine = {r["concurrency"]: r["tok_s"] for r in res["rows"] if r["system"] == "retort engine"}
    # nothing serving this model can outrun its matmuls alone
    assert all(res["matmul_ceiling_tok_s"][str(c)] > engine[c] for c in (1, 2))


def test_matmul_ceiling_grows_with_batch_and_counts_every_linear():
    model = Transformer(preset("tiny")).init_weights(0)
    one = bench.matmul_ceiling_tok_s(model, 1, 16, 8, torch.device("cpu"), torch.float32, reps=3)
    eight = bench.matmul_ceiling_tok_s(model, 8, 16, 8, torch.device("cpu"), torch.float32, reps=3)
    assert eight > one > 0  # batching amortizes each call


def test_async_bench_prints_both_modes_per_concurrency(capsys):
    from serve import bench_async

    assert (
        bench_async.main(
            [
                "--device",
                "cpu",
                "--preset",
                "tiny",
                "--concurrency",
                "4",
                "1",
                "--rounds",
                "1",
                "--prompt-len",
                "8",
                "--output-len",
                "12",
            ]
        )
        == 0
    )
    rows = re.findall(r"^\| (\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|$", capsys.readouterr().out, re.M)
    assert [r[0] for r in rows] == ["4", "1"] and all(float(r[1].replace(",", "")) > 0 for r in rows)
