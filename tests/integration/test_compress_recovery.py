"""Prune, then distill (Minitron): the distillation job starting from an existing checkpoint
(``student_init``: a directory or a registry ref), and the compress job's recovery step, which runs
that job with the unpruned source as teacher and the structurally pruned model as student.

Reuses ``test_distill``'s module fixture ``world`` (data, a quickly trained tiny teacher ``tteacher``
in a temporary registry, the session Ray head). The compress source ``tsource`` is a tiny model
trained longer than that teacher (which is little better than unigram, so pruning barely hurts it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_distill import TINY_DATA, losses, make_cfg, world  # noqa: F401 - world: the module fixture

pytestmark = pytest.mark.integration

PRUNE = {
    "method": "structured",
    "sparsity": 0.5,
    "head_sparsity": 0.5,
}  # tiny: d_ff 192 -> 96, 4 -> 2 query heads


@pytest.fixture(scope="module")
def pruned(world):  # noqa: F811 - the imported fixture
    """The teacher pruned (PRUNE), as a checkpoint dir with the data's tokenizer, also published as ``tpruned``."""
    from cluster.config.compress import PruneConfig
    from cluster.model import Transformer
    from cluster.registry import open_registry
    from train.compress.prune import prune_model

    model, record = prune_model(Transformer.from_pretrained(world["teacher_dir"]), PruneConfig(**PRUNE))
    d = world["root"] / "pruned"
    model.save_pretrained(d, extra_config={"pruning": record})
    for f in Path(world["data"].tokenizer_dir).iterdir():
        shutil.copy2(f, d / f.name)
    ref = open_registry().publish("tpruned", d, lineage={}, metrics={})
    return {"dir": d, "ref": str(ref), "model": model}


@pytest.fixture(scope="module")
def source(world):  # noqa: F811
    """A tiny model trained for 300 steps (~20 s), published as ``tsource`` with the data's tokenizer."""
    import torch

    from cluster.config.model import preset
    from cluster.model import Transformer
    from cluster.registry import open_registry
    from train.data import load_split
    from train.data.loader import packed_batches

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core box: more threads only contend (10x slower)
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _, xy in packed_batches(load_split(world["data"].dir, "train"), 64, 16, seed=2, max_steps=300):
        loss = torch.nn.functional.cross_entropy(model(xy[:, :-1]).flatten(0, 1), xy[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    d = world["root"] / "source"
    model.save_pretrained(d)
    for f in Path(world["data"].tokenizer_dir).iterdir():
        shutil.copy2(f, d / f.name)
    return str(open_registry().publish("tsource", d, lineage={}, metrics={}))


def init_cfg(world, name: str, **kw):  # noqa: F811
    """``make_cfg`` without its explicit ``student_preset`` (the architecture comes from student_init)."""
    from cluster.config.distill import DistillConfig

    d = make_cfg(world, name, **kw).model_dump(exclude_unset=True)
    if "student_preset" not in kw:
        d.pop("student_preset")
    return DistillConfig.model_validate(d)


# ---------------------------------------------------------------------------------------------- distill: student_init


def test_student_init_dir_gives_architecture_and_weights(world, pruned):  # noqa: F811
    import torch

    from train.distill.job import make_plan
    from train.distill.loop import build_student

    cfg = init_cfg(world, "init-dir", student_init=str(pruned["dir"]))
    _, info = make_plan(cfg, "test")
    assert info["student_init_ref"] == str(pruned["dir"].resolve())
    assert (cfg.student.d_ff, cfg.student.n_heads, cfg.student.n_kv_heads) == (96, 2, 2)
    sd = build_student(cfg, None).student.state_dict()
    ref = pruned["model"].state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_student_init_bad_inputs_are_refused(world, pruned, tmp_path):  # noqa: F811
    from cluster.errors import RetortError
    from cluster.model import Transformer
    from cluster.quant import quantize_model
    from cluster.registry import open_registry
    from cluster.tokenizer import train_tokenizer
    from train.distill.job import make_plan

    with pytest.raises(
        RetortError, match=r"student_preset 'tiny' conflicts with student_init .*d_ff 192 != 96"
    ):
        make_plan(init_cfg(world, "init-preset", student_init=pruned["ref"], student_preset="tiny"), "test")
    with pytest.raises(RetortError, match="nosuchmodel"):
        make_plan(init_cfg(world, "init-unknown", student_init="nosuchmodel@latest"), "test")
    other = tmp_path / "other-tok"
    shutil.copytree(pruned["dir"], other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    train_tokenizer(["def f(x):\n    return x + 1\n" * 50, "class A: pass\n" * 50], 300, other)
    with pytest.raises(RetortError, match=r"student_init .*tokenizer .* differs"):
        make_plan(init_cfg(world, "init-tok", student_init=str(other)), "test")
    short = tmp_path / "short"
    shutil.copytree(pruned["dir"], short)
    hf = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**hf, "max_position_embeddings": 32}))
    with pytest.raises(
        ValueError, match=r"seq_len \(64\) > the student's max_seq_len \(32\)"
    ):  # a dir: at validation
        init_cfg(world, "init-short", student_init=str(short))
    open_registry().publish("tshort", short, lineage={}, metrics={})
    with pytest.raises(
        RetortError, match=r"student_init tshort:1: seq_len \(64\) > the student's max_seq_len \(32\)"
    ):
        make_plan(init_cfg(world, "init-short-ref", student_init="tshort"), "test")  # a ref: once resolved
    quant = tmp_path / "quant"
    m = quantize_model(Transformer.from_pretrained(pruned["dir"]), "int8")
    m.save_pretrained(quant, extra_config={"quantization_config": m.quantization_config})
    with pytest.raises(RetortError, match="is quantized"):
        make_plan(init_cfg(world, "init-quant", student_init=str(quant)), "test")


def test_distill_from_registry_ref_starts_at_the_init_models_loss(world, pruned):  # noqa: F811
    """Step 1's loss (computed before the first update) is the init model's loss on that batch."""
    import torch

    from cluster.model import Transformer
    from cluster.registry import open_registry
    from train.distill.job import run
    from train.distill.loop import Batches, Plan
    from train.distill.losses import DenseTeacher, kd_loss

    cfg = init_cfg(
        world,
        "init-ref",
        student_init="tpruned@latest",
        num_workers=1,
        micro_batch_size=8,
        zero_stage=0,
        steps=3,
        checkpoint_every=3,
        warmup_steps=1,
        publish=True,
        publish_name="tstudent-init",
    )
    final = run(cfg)
    rows = losses(cfg)
    plan = Plan(
        data_dir=str(world["data"].dir),
        vocab_size=world["data"].vocab_size,
        teacher_dir=None,
        topk_dir=None,
        config_hash="",
        job_id="",
        metrics_path="",
    )
    x, y, _ = Batches(cfg, plan, dp_rank=0, start_step=0).next_step()[0]
    init, teacher = (
        Transformer.from_pretrained(pruned["dir"]),
        Transformer.from_pretrained(world["teacher_dir"]),
    )
    with torch.no_grad():
        want = kd_loss(init(x), DenseTeacher(teacher(x)), y, cfg.loss, vocab_size=plan.vocab_size)
    assert rows[1]["loss"] == pytest.approx(float(want["loss"]), rel=1e-4)
    assert rows[1]["ce"] == pytest.approx(float(want["ce"]), rel=1e-4)
    man = open_registry().show(final["ref"])
    assert man["lineage"]["parents"] == [world["ref"], pruned["ref"]]
    assert man["lineage"]["config"]["student"]["d_ff"] == 96


# ---------------------------------------------------------------------------------------------- compress: recovery


EVAL = [
    "eval.max_tokens=4096",
    "eval.decode_prompt=4",
    "eval.decode_tokens=4",
    "eval.decode_batches=[1]",
    "eval.isolate=false",
]
RECOVERY = [
    "recovery.enabled=true",
    "recovery.steps=40",
    "recovery.warmup_steps=4",
    "recovery.lr=3e-3",
    "recovery.num_workers=1",
    "recovery.micro_batch_size=8",
]


def test_compress_recovery_adds_a_better_recovered_row(world, source, ray_env, tmp_path, capsys):  # noqa: F811
    from train.compress.__main__ import main

    variants = (
        f"[{{name: pruned, prune: {json.dumps(PRUNE)}, publish: false}}, "
        f"{{name: pruned-int8, prune: {json.dumps(PRUNE)}, quant: {{scheme: int8}}, publish: false}}]"
    )
    args = [
        "-c",
        "configs/compress/tiny.yaml",
        "source=tsource",
        f"out_dir={tmp_path}",
        f"variants={variants}",
        "fail_on_gate=false",
        *EVAL,
        *RECOVERY,
    ]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert "(2/5) recovery of pruned: distill the pruned model from tsource:1 (40 steps)" in out
    assert "| pruned-recovered" in out and "| pruned-int8 (recovered)" in out
    (run_dir,) = tmp_path.iterdir()
    rows = {r["name"]: r for r in json.loads((run_dir / "results.json").read_text())}
    assert list(rows) == ["baseline", "pruned", "pruned-recovered", "pruned-int8 (recovered)"]
    assert rows["pruned-recovered"]["params"] == rows["pruned"]["params"] < rows["baseline"]["params"]
    # the point of recovery: distilling from the unpruned model wins back a good part of the perplexity lost
    base, pruned, recovered = (rows[n]["ppl"] for n in ("baseline", "pruned", "pruned-recovered"))
    assert pruned > 1.05 * base, rows  # pruning hurt (else there is nothing to recover)
    assert recovered < pruned - 0.3 * (pruned - base), (base, pruned, recovered)
    assert rows["pruned-int8 (recovered)"]["ppl"] < pruned
    for name in ("pruned-recovered", "pruned-int8"):
        hf = json.loads((run_dir / name / "config.json").read_text())
        assert hf["recovery"]["teacher"] == "tsource:1" and hf["recovery"]["steps"] == 40
        assert hf["pruning"]["d_ff"] == 96 and hf["intermediate_size"] == 96
    assert (
        json.loads((run_dir / "pruned-int8" / "config.json").read_text())["quantization_config"]["scheme"]
        == "int8"
    )


def test_compress_recovery_bad_inputs_exit_2(world, pruned, tmp_path, capsys):  # noqa: F811
    from train.compress.__main__ import main

    base = ["-c", "configs/compress/tiny.yaml", f"out_dir={tmp_path}", *EVAL]
    structured = f"variants=[{{name: p, prune: {json.dumps(PRUNE)}}}]"
    cases = [
        (
            ["source=tteacher", "recovery.enabled=true"],
            "recovery.enabled needs a variant with structured pruning",
        ),
        (["source=nosuchmodel@latest", structured, "recovery.enabled=true"], "nosuchmodel"),
        ([f"source={pruned['dir']}", structured, "recovery.enabled=true"], "must be a registry ref"),
        (
            ["source=tteacher", structured, "recovery.enabled=true", "recovery.distill={teacher: x}"],
            "recovery.distill may not set teacher",
        ),
    ]
    for extra, msg in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and err.strip().count("\n") == 0 and "Traceback" not in err, err
