"""``python -m train.compress.bench``: the kernel micro-benchmark and the optimization table.

    python -m train.compress.bench --kernels                 # kernel table only (2048x8192 linear)
    python -m train.compress.bench --decode --preset base --vocab 4096 --threads 2   # whole-model decode table
    python -m train.compress.bench --decode --source DIR|REF --threads 2             # ... of a real checkpoint
    python -m train.compress.bench -c configs/compress/small.yaml [key=value ...]   # + optimization table

Kernel table: every kernel of every scheme that runs on the device, µs per call of one linear
(in 2048 -> out 8192 by default) at batch 1 and 16, and its speed relative to the float32
``F.linear`` measured in the same run (> 1 = faster). The optimization table builds the
configured variants from the source model and measures them exactly as the compress job does,
without publishing anything. Decode table: the model (a preset with random weights, or a checkpoint)
saved in fp32 and RTN-quantized to each scheme (every linear and the embedding table; the tied head
shares it), each loaded back through ``Transformer.from_pretrained`` in a fresh process and decoded
greedily at each batch size; tokens/s and whole-file bytes relative to fp32 measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cluster import quant
from train.compress.table import render


def _time(fn, device: torch.device, min_s: float = 0.3, max_reps: int = 200) -> float:
    """Fastest µs per call after warm-up, at least 5 reps or ``min_s`` seconds: the least disturbed run, as
    kernel selection measures (on a CPU shared with other jobs a median mostly measures their load)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_s and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times) * 1e6


def kernel_table(
    in_f: int = 2048,
    out_f: int = 8192,
    batches: tuple[int, ...] = (1, 16),
    device: str = "cpu",
    group_size: int = 128,
) -> str:
    dev = torch.device(device)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    mods = {
        "int8": quant.Int8Linear.from_float(lin, symmetric=True, name="bench"),
        "int8-asym": quant.Int8Linear.from_float(lin, symmetric=False, name="bench"),
        "int4": quant.Int4Linear.from_float(lin, group_size=group_size, name="bench"),
        "w8a8": quant.W8A8Linear.from_float(lin, name="bench"),
        "w4a8": quant.W4A8Linear.from_float(lin, group_size=group_size, name="bench"),
    }
    w32 = lin.weight.detach().to(dev)
    rows = [["scheme", "kernel", *[f"b{b} µs" for b in batches], *[f"b{b} vs fp32" for b in batches]]]
    base: dict[int, float] = {}
    for b in batches:
        x = torch.randn(b, in_f, device=dev)
        base[b] = _time(lambda x=x: F.linear(x, w32), dev)
    rows.append(["fp32", "F.linear", *[f"{base[b]:.0f}" for b in batches], *["1.00x" for _ in batches]])
    for dt in (torch.bfloat16, torch.float16) if dev.type == "cuda" else (torch.bfloat16,):
        wl, ts = w32.to(dt), {}
        for b in batches:
            xl = torch.randn(b, in_f, device=dev, dtype=dt)
            ts[b] = _time(lambda xl=xl, wl=wl: F.linear(xl, wl), dev)
        rows.append(
            [
                str(dt).replace("torch.", ""),
                "F.linear",
                *[f"{ts[b]:.0f}" for b in batches],
                *[f"{base[b] / ts[b]:.2f}x" for b in batches],
            ]
        )
    for label, m in mods.items():
        m = m.to(dev)
        for name, kernel in quant.KERNELS[m.scheme].items():
            if dev.type not in kernel.devices:
                continue
            cells, ratios = [], []
            for b in batches:
                x = torch.randn(b, in_f, device=dev)
                try:
                    kernel.run(m, x)
                    t = _time(lambda x=x, k=kernel, m=m: k.run(m, x), dev)
                    cells.append(f"{t:.0f}")
                    ratios.append(f"{base[b] / t:.2f}x")
                except (RuntimeError, NotImplementedError) as e:
                    cells.append("n/a")
                    ratios.append(str(e).split("\n")[0][:40])
            rows.append([label, name, *cells, *ratios])
        for b in batches:  # what selection picks for this shape
            m.kernel_for(torch.randn(b, in_f, device=dev))
        picks = sorted({k for k in m._choice.values()})
        rows.append([label, f"auto -> {','.join(picks)}", *["" for _ in batches], *["" for _ in batches]])
    return render(rows)


def _file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def decode_table(
    model_dir: Path,
    workdir: Path,
    schemes: list[str],
    group_size: int,
    batches: list[int],
    prompt: int,
    tokens: int,
    threads: int | None,
    rounds: int = 1,
) -> str:
    """Quantize the fp32 checkpoint ``model_dir`` to each scheme under ``workdir``; measure decode of each
    in a fresh process (best of ``rounds`` passes over all variants, so that load on a shared machine
    hits every variant alike)."""
    from cluster.model import Transformer
    from train.compress.decode_bench import measure_in_subprocess

    dirs = {"fp32": model_dir}
    for scheme in schemes:
        if scheme == "fp32":
            continue
        model = Transformer.from_pretrained(model_dir)
        quant.quantize_model(
            model, scheme, group_size if scheme in quant.GROUPED else None, modules_not_converted=[]
        )
        dirs[scheme] = workdir / scheme
        model.save_pretrained(dirs[scheme], extra_config={"quantization_config": model.quantization_config})
    results: dict[str, dict] = {}
    for _ in range(rounds):
        for name, d in dirs.items():
            r = measure_in_subprocess(d, batches, prompt, tokens, threads)
            best = results.setdefault(name, r)
            for b in batches:
                best[f"tok_s_b{b}"] = max(best[f"tok_s_b{b}"], r[f"tok_s_b{b}"])
    base, fp_bytes = results["fp32"], _file_bytes(model_dir)
    rows = [
        [
            "variant",
            "file MB",
            "bytes vs fp32",
            *[f"tok/s b{b}" for b in batches],
            *[f"b{b} vs fp32" for b in batches],
            "kernels",
        ]
    ]
    for name, r in results.items():
        qcfg = json.loads((dirs[name] / "config.json").read_text()).get("quantization_config") or {}
        emb = (qcfg.get("embeddings") or {}).get("scheme", "fp32") if qcfg else "fp32"
        label = (
            name + (f" g{group_size}" if name in quant.GROUPED else "") + (f" (emb {emb})" if qcfg else "")
        )
        nb = _file_bytes(dirs[name])
        rows.append(
            [
                label,
                f"{nb / 1e6:.1f}",
                f"1/{fp_bytes / nb:.2f}",
                *[f"{r[f'tok_s_b{b}']:.1f}" for b in batches],
                *[f"{r[f'tok_s_b{b}'] / base[f'tok_s_b{b}']:.2f}x" for b in batches],
                ",".join(r.get("kernels") or []) or "-",
            ]
        )
    return render(rows)


def _decode_source(a: argparse.Namespace, workdir: Path) -> Path:
    """The fp32 checkpoint to quantize: ``--source`` (a directory or a registry ref) or a preset."""
    from cluster.config.model import preset
    from cluster.model import Transformer

    if a.source:
        if Path(a.source).expanduser().is_dir():
            return Path(a.source).expanduser()
        from cluster.registry import open_registry

        reg = open_registry(None)
        return reg.resolve(reg.ref(a.source))
    overrides = {"vocab_size": a.vocab} if a.vocab else {}
    model = Transformer(preset(a.preset, **overrides)).init_weights(seed=0)
    model.save_pretrained(workdir / "fp32")
    return workdir / "fp32"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.compress.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", default=None, help="compress config: also print the optimization table")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. source=runs/model")
    p.add_argument("--kernels", action="store_true", help="only the kernel table")
    p.add_argument("--device", default="cpu", help="cpu or cuda (kernel table)")
    p.add_argument("--shape", type=int, nargs=2, default=(2048, 8192), metavar=("IN", "OUT"))
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--decode", action="store_true", help="only the whole-model decode table")
    p.add_argument("--preset", default="base", help="decode table: model preset (random weights)")
    p.add_argument("--vocab", type=int, default=None, help="decode table: vocab size override for --preset")
    p.add_argument("--source", default=None, help="decode table: fp32 checkpoint dir or registry ref instead")
    p.add_argument("--schemes", nargs="+", default=["fp32", "int8", "w8a8", "int4", "w4a8"])
    p.add_argument("--group-size", type=int, default=128, help="decode table: int4/w4a8 group size")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="decode table: batch sizes")
    p.add_argument("--tokens", type=int, default=32, help="decode table: tokens generated per measurement")
    p.add_argument("--rounds", type=int, default=1, help="decode table: passes over all variants (best kept)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if a.device == 'cuda' else ''}",
        flush=True,
    )
    if a.decode:
        bad = [s for s in a.schemes if s != "fp32" and s not in quant.SCHEMES]
        if bad:
            p.error(f"--schemes: unknown scheme {bad[0]!r}; known: fp32, {', '.join(quant.SCHEMES)}")
        with tempfile.TemporaryDirectory(prefix="retort-decode-") as tmp:
            src = _decode_source(a, Path(tmp))
            print(
                f"\nWhole-model decode ({src}; prompt 16, {a.tokens} tokens, greedy, fresh process each)\n",
                flush=True,
            )
            print(
                decode_table(
                    src,
                    Path(tmp),
                    ["fp32", *a.schemes],
                    a.group_size,
                    a.batch,
                    16,
                    a.tokens,
                    a.threads,
                    a.rounds,
                ),
                flush=True,
            )
        return 0
    print(f"\nKernel micro-benchmark: one {a.shape[0]}->{a.shape[1]} linear\n", flush=True)
    print(kernel_table(a.shape[0], a.shape[1], device=a.device), flush=True)
    if a.kernels or a.config is None:
        return 0
    from cluster.config import load_config
    from cluster.config.compress import CompressConfig
    from train.compress.job import run

    cfg = load_config(a.config, CompressConfig, a.overrides)
    print("\nOptimization table (nothing is published)\n", flush=True)
    run(cfg, publish_results=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
