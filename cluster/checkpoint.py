"""Hugging Face checkpoint directories: ``config.json`` + ``model.safetensors``.

Only safetensors and JSON are ever read — never a pickle. A checkpoint may describe its own
quantization in ``config.json["quantization_config"]`` (written by ``train.compress``): the
loader swaps in the runtime modules from ``cluster.quant`` before loading the tensors, so
nothing is ever inferred from a file name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cluster.config.model import ModelConfig
from cluster.errors import RetortError

SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "llama"}
WEIGHTS = "model.safetensors"


def _rope_theta(hf: dict[str, Any]) -> float:
    rp = hf.get("rope_parameters") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise RetortError(
            f"unsupported rope scaling {rp.get('rope_type')!r}; only default RoPE is implemented"
        )
    rs = hf.get("rope_scaling")
    if rs and rs.get("rope_type", rs.get("type", "default")) != "default":
        raise RetortError(f"unsupported rope_scaling {rs!r}; only default RoPE is implemented")
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    archs = hf.get("architectures") or []
    arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise RetortError(
            f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; supported: {', '.join(SUPPORTED)}"
        )
    if hf.get("mlp_bias"):
        raise RetortError(f"{source}: mlp_bias=true is not supported")
    if arch == "llama" and hf.get("attention_bias"):
        raise RetortError(f"{source}: attention_bias=true (bias on o_proj) is not supported")
    if hf.get("sliding_window") and hf.get("use_sliding_window", arch != "qwen2"):
        raise RetortError(f"{source}: sliding-window attention is not supported")
    n_heads = hf["num_attention_heads"]
    try:
        return ModelConfig(
            arch=arch,
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim")
            if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads)
            else None,
            d_ff=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=_rope_theta(hf),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2",
            init_std=hf.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise RetortError(f"{source}: missing field {e.args[0]!r}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    arch = "Qwen2ForCausalLM" if cfg.arch == "qwen2" else "LlamaForCausalLM"
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim_head,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if cfg.arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def read_hf_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise RetortError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RetortError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None


def weight_files(path: Path) -> list[Path]:
    single = path / WEIGHTS
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise RetortError(f"{path}: only safetensors weights are loaded (found pickle *.bin/*.pt files)")
    raise RetortError(f"{path}: no model.safetensors")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(path)):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                sd[k] = fh.get_tensor(k)
    return sd


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a checkpoint directory into ``cluster.model.Transformer`` (quantized ones too)."""
    from cluster.model import Transformer

    path = Path(path)
    hf = read_hf_config(path)
    cfg = config_from_hf(hf, source=str(path / "config.json"))
    sd = read_state_dict(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    qcfg = hf.get("quantization_config")
    if qcfg:
        from cluster.quant import prepare_for_load  # noqa: PLC0415 - runtime modules only when needed

        prepare_for_load(model, qcfg)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    expected = set(model.state_dict().keys())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - sd.keys())
    unexpected = sorted(k for k in sd.keys() - expected if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise RetortError(
            f"{path}: missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    if unexpected:
        raise RetortError(
            f"{path}: unexpected tensors: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):  # a quantized table ties itself
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            raise RetortError(f"{path}: tensor {name} was not loaded")
    if dtype is not None:
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return model.to(device).eval()


def save_model(model, path: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` with HF tensor names (tied head omitted, as HF does)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(model.cfg)
    if extra_config:
        hf.update(extra_config)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    if dtypes == {torch.bfloat16}:
        hf["torch_dtype"] = "bfloat16"
    elif dtypes == {torch.float16}:
        hf["torch_dtype"] = "float16"
    save_file(sd, str(path / WEIGHTS), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model_dir: str | os.PathLike[str]) -> str:
    """One digest of a checkpoint's weights: sha256 over the sorted ``*.safetensors`` files' digests."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise RetortError(f"{model_dir}: no *.safetensors weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()
