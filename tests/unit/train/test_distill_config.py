"""DistillConfig validation, the DeepSpeed config it produces, the LR schedule, FLOPs/token, the pipeline layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import load_config
from cluster.config.distill import DistillConfig
from cluster.errors import ConfigError
from train.distill.ds_config import deepspeed_config, lr_lambda, param_groups

REPO = Path(__file__).resolve().parents[3]


def cfg(**kw) -> DistillConfig:
    return DistillConfig.model_validate({"student_preset": "tiny", "seq_len": 64, **kw})


@pytest.mark.parametrize("name", ["tiny", "small", "base", "pipeline-tiny", "pipeline-2gpu"])
def test_shipped_configs_validate(name):
    c = load_config(REPO / "configs" / "distill" / f"{name}.yaml", DistillConfig)
    assert c.global_batch == c.micro_batch_size * c.grad_accum * c.dp_world


@pytest.mark.parametrize("stage", [2, 3])
def test_pipeline_with_zero_2_or_3_is_refused_with_the_reason(stage):
    with pytest.raises(ValueError, match=r"pipeline engine asserts ZeRO < 2"):
        cfg(mode="pipeline", zero_stage=stage, teacher_source="topk")


def test_pipeline_needs_topk_and_enough_layers_and_whole_stages():
    with pytest.raises(ValueError, match="teacher_source=topk"):
        cfg(mode="pipeline", zero_stage=1)
    with pytest.raises(ValueError, match=r"pipeline_stages \(3\) > the student's n_layers \(2\)"):
        cfg(mode="pipeline", teacher_source="topk", pipeline_stages=3, num_workers=3)
    with pytest.raises(ValueError, match=r"num_workers \(3\) must be a multiple of pipeline_stages \(2\)"):
        cfg(mode="pipeline", teacher_source="topk", num_workers=3)
    ok = cfg(mode="pipeline", teacher_source="topk", num_workers=4, micro_batch_size=2, grad_accum=4)
    assert ok.dp_world == 2 and ok.global_batch == 16


def test_batch_that_does_not_divide_is_refused():
    with pytest.raises(
        ValueError,
        match=r"global_batch_size \(10\) != micro_batch_size \(4\) x grad_accum \(1\) x "
        r"data-parallel world \(2\) = 8",
    ):
        cfg(global_batch_size=10, micro_batch_size=4, num_workers=2)
    assert cfg(global_batch_size=16, micro_batch_size=4, grad_accum=2, num_workers=2).global_batch == 16


def test_other_refusals():
    with pytest.raises(ValueError, match="seq_len"):
        cfg(seq_len=1024)
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage >= 1"):
        cfg(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="hidden_weight"):
        cfg(teacher_source="topk", loss={"hidden_weight": 1.0})
    with pytest.raises(ValueError, match="implicit"):
        cfg(publish_alias="latest")
    with pytest.raises(ValueError, match="unknown student_preset"):
        cfg(student_preset="huge")


def test_cli_style_errors_are_one_line(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("mode: pipeline\nzero_stage: 3\nteacher_source: topk\nstudent_preset: tiny\nseq_len: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, DistillConfig)
    assert "\n" not in str(e.value) and "ZeRO < 2" in str(e.value)


def test_training_hash_ignores_operational_fields_only():
    a = cfg()
    assert (
        a.training_hash()
        == cfg(max_failures=9, checkpoint_every=7, run_dir="/x", publish=False).training_hash()
    )
    assert a.training_hash() != cfg(lr=5e-4).training_hash()
    assert a.training_hash() != cfg(zero_stage=2).training_hash()


def test_deepspeed_config_fields():
    c = cfg(zero_stage=3, micro_batch_size=2, grad_accum=3, num_workers=2, grad_clip=0.5)
    ds = deepspeed_config(c)
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert (
        ds["zero_optimization"]["stage"] == 3
        and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    )
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: torch AdamW + LambdaLR
    assert ds["bf16"]["enabled"] is False  # CPU: fp32 even if asked
    assert deepspeed_config(cfg(bf16=True, use_gpu=True), bf16=True)["bf16"]["enabled"] is True
    off = deepspeed_config(cfg(zero_stage=2, offload_optimizer=True))
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_force_ds_cpu_optimizer"] is False


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = lr_lambda(cfg(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_param_groups_decay_matrices_only_and_dedupe_tied():
    from cluster.config.model import preset
    from cluster.model import Transformer

    m = Transformer(preset("tiny", tie_embeddings=True))
    groups = param_groups(m, 0.1)
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == m.num_params()
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() == 1 for p in groups[1]["params"])


def test_flops_per_token_palm_formula():
    from train.distill.loop import flops_per_token

    c = cfg(student_preset="base", seq_len=1024)
    m = c.student_model()
    blocks = m.n_layers * (4 * m.d_model**2 + 3 * m.d_model * m.d_ff)  # MHA: q, k, v, o all d x d
    n = blocks + m.vocab_size * m.d_model
    assert flops_per_token(c) == 6 * n + 12 * m.n_layers * 1024 * m.d_model


def test_pipeline_layers_reproduce_the_model():
    """The pipeline's layer modules, run in order, give the Transformer's logits (same init)."""
    from cluster.config.model import preset
    from cluster.model import Transformer
    from train.distill.pipeline import BlockPipe, EmbedPipe, HeadPipe, NormPipe, head_forward

    for tie in (False, True):
        m = Transformer(preset("tiny", tie_embeddings=tie)).init_weights(3)
        sd = m.state_dict()
        layers = [EmbedPipe(m.cfg, sd["model.embed_tokens.weight"])]
        for i in range(m.cfg.n_layers):
            pre = f"model.layers.{i}."
            layers.append(BlockPipe(m.cfg, i, {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}))
        layers.append(NormPipe(m.cfg, sd["model.norm.weight"]))
        x = torch.randint(0, m.cfg.vocab_size, (2, 16))
        h = x
        for layer in layers:
            h = layer(h)
        logits = head_forward(layers[0], h) if tie else HeadPipe(m.cfg, sd["lm_head.weight"])(h)
        torch.testing.assert_close(logits, m(x), rtol=1e-5, atol=1e-5)
