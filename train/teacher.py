"""The teacher: pretrain one from scratch on the corpus, or import a Hugging Face checkpoint; publish it.

    python -m train.teacher -c configs/teacher/small.yaml [training.steps=800 ...]
    retort teacher -c configs/teacher/small.yaml [--local]

Pretraining is a plain single-process PyTorch loop: AdamW (decay on matrices only), linear
warm-up then cosine decay to ``min_lr_ratio * lr``, gradient clipping, packed windows from
``train.data.loader``, a progress bar, and the held-out perplexity every ``eval_every`` steps
(step 0 included, so the curve starts near the vocabulary size). Import reads an HF checkpoint
directory (Llama / Qwen2 / Mistral, safetensors) and its tokenizer and evaluates it.

Either way the checkpoint directory (``config.json``, ``model.safetensors``, the tokenizer files,
``training.json`` with the curve and the resolved config) is published to the registry with
its lineage (dataset fingerprint, tokenizer sha256, resolved config, parents) and metrics (val
perplexity, parameters, training tokens, seconds), promoted to ``alias``, optionally followed by
the top-k cache (``topk.enabled``). The last stdout line is the registry ref (``teacher:3``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cluster.config.model import ModelConfig, preset
from cluster.config.teacher import TeacherConfig
from cluster.errors import RetortError
from cluster.model import Transformer
from cluster.tokenizer import copy_tokenizer_files
from train.evaluate import perplexity


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RetortError("training.device=cuda but CUDA is not available on this machine")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def lr_at(step: int, cfg: TeacherConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio * lr`` at ``steps``."""
    t = cfg.training
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    floor = t.min_lr_ratio * t.lr
    return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TeacherConfig) -> torch.optim.AdamW:
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases
    groups = [
        {"params": decay, "weight_decay": cfg.training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.training.lr, betas=cfg.training.betas)


def model_config(cfg: TeacherConfig, vocab_size: int) -> ModelConfig:
    """The architecture to pretrain, its vocab set to the tokenizer's."""
    base = cfg.model if cfg.model is not None else preset(cfg.model_preset)
    mc = base.model_copy(update={"vocab_size": vocab_size})
    if cfg.training.seq_len > mc.max_seq_len:
        raise RetortError(
            f"training.seq_len {cfg.training.seq_len} exceeds the model's max_seq_len {mc.max_seq_len}"
        )
    return ModelConfig.model_validate(mc.model_dump())


def pretrain(cfg: TeacherConfig, data, device: torch.device) -> tuple[Transformer, dict[str, Any]]:
    """The training loop. Returns the model and ``{"curve": [...], "train_tokens", "train_seconds"}``."""
    from tqdm import tqdm

    from train.data import load_split
    from train.data.loader import packed_batches

    t = cfg.training
    torch.manual_seed(t.seed)
    model = Transformer(model_config(cfg, data.vocab_size)).init_weights(seed=t.seed).to(device)
    opt = make_optimizer(model, cfg)
    train_tokens, val_tokens = load_split(data.dir, "train"), load_split(data.dir, "val")
    batches = packed_batches(train_tokens, t.seq_len, t.batch_size, seed=t.seed, max_steps=t.steps)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if (t.bf16 and device.type == "cuda") else nullcontext()
    )
    tok_per_step = t.batch_size * t.seq_len
    curve: list[dict[str, Any]] = []
    loss_ema: float | None = None

    def evaluate(step: int, seconds: float) -> None:
        ppl = perplexity(model, val_tokens, t.seq_len, t.seq_len, cfg.eval.batch_size, t.eval_tokens)
        curve.append({"step": step, "tokens": step * tok_per_step, "seconds": round(seconds, 2),
                      "cpu_seconds": round(time.process_time() - c0, 2),
                      "train_loss": None if loss_ema is None else round(loss_ema, 4), "val_ppl": round(ppl, 3)})  # fmt: skip
        tqdm.write(f"step {step:5d}  tokens {step * tok_per_step:>9,}  {seconds:7.1f}s  "
                   f"train loss {loss_ema if loss_ema is not None else float('nan'):.3f}  val ppl {ppl:9.2f}")  # fmt: skip

    t0, c0 = time.perf_counter(), time.process_time()  # CPU time: for runs on a shared machine
    evaluate(0, 0.0)
    model.train()
    bar = tqdm(total=t.steps, desc=f"teacher {cfg.name}", unit="step", file=sys.stderr)
    for step, (_, x) in enumerate(batches, start=1):
        x = x.to(device)  # (B, T+1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1, cfg)
        with amp:
            logits = model(x[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_ema:.3f}",
            lr=f"{lr_at(step - 1, cfg):.2e}",
            tok_s=f"{step * tok_per_step / elapsed:,.0f}",
        )
        if step % t.eval_every == 0 or step == t.steps:
            evaluate(step, time.perf_counter() - t0)
            model.train()
    bar.close()
    model.eval()
    return model, {
        "curve": curve,
        "train_tokens": t.steps * tok_per_step,
        "train_seconds": time.perf_counter() - t0,
        "train_cpu_seconds": time.process_time() - c0,
    }


def import_checkpoint(cfg: TeacherConfig, device: torch.device) -> tuple[Transformer, Path]:
    """Load ``import_dir`` (refusing unsupported architectures) after checking it has a tokenizer."""
    from cluster.checkpoint import load_model

    src = Path(cfg.import_dir or "").expanduser()
    if not src.is_dir():
        raise RetortError(f"import_dir {src}: no such directory")
    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise RetortError(
            f"import_dir {src}: no tokenizer (tokenizer.json or tokenizer.model); a teacher needs its tokenizer"
        )
    return load_model(src, device=device), src


def val_tokens_for(cfg: TeacherConfig, data, tokenizer) -> np.ndarray:
    """Held-out tokens in the teacher's own tokenizer: the data's val split, re-encoded if the tokenizers differ."""
    from train.data import load_split

    if tokenizer.sha256 == data.tokenizer_sha256:
        return load_split(data.dir, "val")
    from train.data.corpus import read_corpus, split_documents

    print(f"note: the imported tokenizer ({tokenizer.sha256[:12]}) is not the data's ({data.tokenizer_sha256[:12]}): "
          "evaluating on the val documents re-encoded with it; distilling from this teacher needs data "
          "tokenized with its tokenizer", file=sys.stderr)  # fmt: skip
    docs, _ = read_corpus(cfg.data)
    ids: list[int] = []
    limit = cfg.eval.max_tokens or sys.maxsize
    val = split_documents(docs, cfg.data.val_fraction, cfg.data.seed)["val"]
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for i in range(0, len(val), 64):  # as train.data encodes: special-token strings are plain text
        for doc_ids in tokenizer.encode_ordinary_batch([d.text for d in val[i : i + 64]]):
            ids += doc_ids + eos
        if len(ids) >= limit:
            break
    return np.asarray(ids, dtype=np.int64)


def save_checkpoint(
    model: Transformer, tokenizer_dir: Path, out: Path, tokenizer, record: dict[str, Any]
) -> Path:
    """``config.json`` + ``model.safetensors`` + tokenizer files + ``training.json`` in ``out``."""
    model.save_pretrained(
        out, extra_config={"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    )
    copy_tokenizer_files(tokenizer_dir, out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def evaluate_teacher(
    cfg: TeacherConfig, model: Transformer, data, tokenizer, record: dict[str, Any]
) -> dict[str, Any]:
    """The final held-out perplexity and the metrics published with the teacher."""
    val = val_tokens_for(cfg, data, tokenizer)
    e = cfg.eval
    seq_len = e.seq_len or cfg.training.seq_len
    stride = e.stride or seq_len
    ppl = perplexity(
        model,
        val,
        seq_len,
        stride,
        e.batch_size,
        e.max_tokens,
        vocab_size=tokenizer.vocab_size,
        progress=True,
    )
    metrics = {
        "val_ppl": round(ppl, 4), "val_loss": round(math.log(ppl), 5), "eval_seq_len": seq_len, "eval_stride": stride,
        "eval_tokens": int(min(len(val), e.max_tokens or len(val))), "params": model.num_params(),
        "train_tokens": record["train_tokens"], "train_seconds": round(record["train_seconds"], 2),
    }  # fmt: skip
    if record["curve"]:
        metrics["initial_val_ppl"] = record["curve"][0]["val_ppl"]
    return metrics


def run(cfg: TeacherConfig):
    """Pretrain or import, evaluate, save, publish, promote [, top-k cache]; prints the ref last."""
    from cluster.registry import open_registry
    from cluster.tokenizer import load_tokenizer
    from train.data import prepare

    t = cfg.training
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = pick_device(t.device)
    reg = open_registry(cfg.registry)  # fail on a bad registry before hours of training
    data = prepare(cfg.data)
    t0 = time.perf_counter()
    if cfg.source == "pretrain":
        model, record = pretrain(cfg, data, device)
        tok_dir = data.tokenizer_dir
    else:
        model, tok_dir = import_checkpoint(cfg, device)
        record = {"curve": [], "train_tokens": 0, "train_seconds": 0.0, "imported_from": str(tok_dir)}
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise RetortError(
            f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.cfg.vocab_size} rows"
        )
    metrics = evaluate_teacher(cfg, model, data, tokenizer, record)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    resolved = cfg.model_dump(mode="json")
    record.update(config=resolved, metrics=metrics, device=str(device), threads=torch.get_num_threads())
    out = Path(cfg.out_dir).expanduser() / f"{cfg.name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    save_checkpoint(model.cpu(), tok_dir, out, tokenizer, record)
    lineage: dict[str, Any] = {"parents": [], "dataset_fingerprint": data.fingerprint, "tokenizer_sha256": tokenizer.sha256,
                               "config": resolved, "source": cfg.source, "kind": "teacher"}  # fmt: skip
    if cfg.source == "import":
        lineage["imported_from"] = str(tok_dir)
    ref = reg.publish(cfg.name, out, lineage=lineage, metrics=metrics)
    if cfg.alias and cfg.alias != "latest":
        reg.promote(ref.name, ref.version, cfg.alias)
    print(json.dumps({"teacher": str(ref), "metrics": metrics}), flush=True)
    if cfg.topk.enabled:
        from train.topk import run as build_topk

        build_topk(cfg.model_copy(update={"topk": cfg.topk.model_copy(update={"teacher": str(ref)})}))
    print(str(ref), flush=True)
    return ref


def main(argv: list[str] | None = None) -> int:
    from cluster.entry import job_main

    return job_main("teacher", run, "train.teacher", argv)


if __name__ == "__main__":
    sys.exit(main())
