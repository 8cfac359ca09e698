"""Where a distillation step's time goes on one GPU, and the ceiling for the ``base`` preset.

    python -m train.distill.bench_kd --batch 64 [--config configs/distill/base.yaml] [--profile OUT.txt]

Models with random weights (the distill config's student, the ``base`` teacher preset), bf16,
compiled decoder blocks, no DeepSpeed and no data loading. It times (CUDA events, median):

- ``gemm``: an 8192^3 bf16 matmul, and each of the step's GEMM shapes (the matmul ceiling);
- ``loss``: the KD loss forward + backward incl. both LM heads: the reference ``kd_loss`` on full
  logits vs ``fused_kd_loss`` (eager chunks, compiled chunks), with their relative differences;
- ``teacher`` forward (hidden state only), ``student`` decoder forward + backward (no head),
  the fused AdamW step, and a whole step (teacher + student + fused loss + backward + AdamW);

and prints MFU (student FLOPs over the GPU's peak) and HFU (with the teacher's forward) for
the whole step and for the student alone. ``train.distill.torchrun_main`` gives the real loop's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch


def bench(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` (CUDA events; host clock on CPU)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/distill/base.yaml")
    ap.add_argument("--teacher-preset", default="base")
    ap.add_argument("--batch", type=int, default=64, help="sequences per step (the micro-batch)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--profile", default=None, help="write a torch.profiler kernel table of the whole step here"
    )
    args = ap.parse_args(argv)

    from cluster.config import load_config
    from cluster.config.distill import DistillConfig
    from cluster.config.model import preset
    from cluster.model import Transformer
    from train.distill.fused_kd import decoder_hidden, fused_kd_loss
    from train.distill.loop import compile_blocks, flops_per_token, teacher_flops_per_token
    from train.distill.losses import DenseTeacher, kd_loss
    from train.distill.torchrun_main import peak_flops

    cfg = load_config(args.config, DistillConfig)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    compile = not args.no_compile and dev.type == "cuda"
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")
    B, T, V = args.batch, cfg.seq_len, cfg.data.vocab_size
    N = B * T
    student = Transformer(cfg.student_model()).init_weights(0).to(dev, dt)
    teacher = (
        Transformer(preset(args.teacher_preset)).init_weights(1).to(dev, dt).eval().requires_grad_(False)
    )
    if compile:
        compile_blocks(student, teacher)
    fpt, tfpt = flops_per_token(cfg), teacher_flops_per_token(cfg, teacher)
    peak = peak_flops() or float("nan")
    rows: list[tuple[str, float, str]] = []

    def tflops(flop: float, ms: float) -> str:
        return f"{flop / ms / 1e9:.0f} TFLOP/s"

    # --- GEMM ceiling
    m = 8192 if dev.type == "cuda" else 1024
    a, b = torch.randn(m, m, device=dev, dtype=dt), torch.randn(m, m, device=dev, dtype=dt)
    ms = bench(lambda a=a, b=b: a @ b, args.reps)
    rows.append((f"gemm {m}^3", ms, tflops(2 * m**3, ms)))
    s, tc = student.cfg, teacher.cfg
    shapes = [
        ("student qkv", s.d_model, 3 * s.d_model),
        ("student o", s.d_model, s.d_model),
        ("student gate+up", s.d_model, 2 * s.d_ff),
        ("student down", s.d_ff, s.d_model),
        ("student head", s.d_model, V),
        ("teacher qkv", tc.d_model, 3 * tc.d_model),
        ("teacher gate+up", tc.d_model, 2 * tc.d_ff),
        ("teacher down", tc.d_ff, tc.d_model),
        ("teacher head", tc.d_model, V),
    ]
    for name, k, n in shapes:
        x, w = torch.randn(N, k, device=dev, dtype=dt), torch.randn(n, k, device=dev, dtype=dt)
        ms = bench(lambda x=x, w=w: x @ w.T, args.reps)
        rows.append((f"gemm {name} ({N}x{k}x{n})", ms, tflops(2 * N * k * n, ms)))
    del a, b, x, w

    # --- the loss (both LM heads included), reference vs fused
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(B, T, s.d_model, generator=g)).to(dev, dt).requires_grad_()
    h_t = decoder_hidden(teacher, torch.randint(0, V, (B, T), generator=g).to(dev))
    y = torch.randint(0, V, (B, T), generator=g).to(dev)
    w_s = student.lm_head.weight
    head_flop = 2 * N * V * (3 * s.d_model + tc.d_model)

    def ref_loss():
        out = kd_loss(h @ w_s.T, DenseTeacher(h_t @ teacher.lm_head.weight.T), y, cfg.loss, vocab_size=V)
        return out, torch.autograd.grad(out["loss"], [h, w_s])

    def fused(comp: bool):
        def f():
            out = fused_kd_loss(
                h,
                w_s,
                h_t,
                teacher.lm_head.weight,
                y,
                cfg.loss,
                vocab_size=V,
                chunk_size=args.chunk,
                compile=comp,
            )
            return out, torch.autograd.grad(out["loss"], [h, w_s])

        return f

    ref_out, ref_g = ref_loss()
    variants = [("loss reference kd_loss", ref_loss), ("loss fused, eager chunks", fused(False))]
    if compile:
        variants.append(("loss fused, compiled chunks", fused(True)))
    loss_ms = {}
    for name, fn in variants:
        out, grads = fn()
        err = max(
            abs(float(out[k].detach()) - float(ref_out[k].detach())) / abs(float(ref_out[k].detach()))
            for k in ("loss", "kd", "ce")
        )
        ms = bench(fn, args.reps)
        loss_ms[name] = ms
        torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
        fn()
        mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        rows.append(
            (
                name,
                ms,
                f"{tflops(head_flop, ms)} on the heads; vs ref: values {err:.1e}, "
                f"dh {rel(grads[0], ref_g[0]):.1e}, dW {rel(grads[1], ref_g[1]):.1e}; peak {mem:.1f} GiB",
            )
        )
    del ref_out, ref_g

    # --- the models
    x = torch.randint(0, V, (B, T), generator=g).to(dev)
    with torch.no_grad():
        ms_t = bench(lambda: decoder_hidden(teacher, x), args.reps)
    rows.append(("teacher forward (hidden only)", ms_t, tflops(N * (tfpt - 2 * tc.d_model * V), ms_t)))
    gh = torch.randn(B, T, s.d_model, device=dev, dtype=dt)
    ms_s = bench(lambda: decoder_hidden(student, x).backward(gh), args.reps)
    rows.append(("student decoder fwd+bwd (no head)", ms_s, tflops(N * (fpt - 6 * s.d_model * V), ms_s)))
    master = [
        p.detach().float().clone().requires_grad_() for p in {id(p): p for p in student.parameters()}.values()
    ]
    for p in master:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(master, lr=1e-4, fused=dev.type == "cuda")
    ms_o = bench(opt.step, args.reps)
    rows.append(
        (
            "AdamW step (fp32 master, fused on CUDA)",
            ms_o,
            f"{sum(p.numel() for p in master) / 1e6:.1f}M params",
        )
    )

    def step(comp: bool):
        with torch.no_grad():
            ht = decoder_hidden(teacher, x)
        out = fused_kd_loss(
            decoder_hidden(student, x),
            student.lm_head.weight,
            ht,
            teacher.lm_head.weight,
            y,
            cfg.loss,
            vocab_size=V,
            chunk_size=args.chunk,
            compile=comp,
        )
        out["loss"].backward()
        opt.step()
        student.zero_grad(set_to_none=True)

    ms_step = bench(lambda: step(compile), args.reps)
    rows.append(("whole step (no DeepSpeed)", ms_step, f"{N / ms_step * 1e3:,.0f} tok/s"))
    loss_share = loss_ms[variants[-1][0]] / ms_step
    if args.profile and dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(compile)
            torch.cuda.synchronize()
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))

    print(
        f"\nbench_kd: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, B={B} T={T} (N={N}), "
        f"V={V}, student d={s.d_model} L={s.n_layers}, teacher d={tc.d_model} L={tc.n_layers}, chunk {args.chunk}, "
        f"compile={compile}, loss {cfg.loss.kind} T={cfg.loss.temperature}"
    )
    print(f"{'what':58s} {'ms':>9s}  notes")
    for name, ms, note in rows:
        print(f"{name:58s} {ms:9.2f}  {note}")
    ref_ms = loss_ms["loss reference kd_loss"]
    print(
        f"loss: fused {ref_ms / loss_ms[variants[-1][0]]:.1f}x faster than the reference; "
        f"fused loss = {loss_share:.0%} of the whole step"
    )
    mfu = N * fpt / (ms_step * 1e-3) / peak
    hfu = N * (fpt + tfpt) / (ms_step * 1e-3) / peak
    alone = ms_s + loss_ms[variants[-1][0]] * (3 * s.d_model) / (3 * s.d_model + tc.d_model) + ms_o
    print(f"whole step: MFU {mfu:.1%}, HFU incl. teacher {hfu:.1%} (peak {peak / 1e12:.0f} TFLOP/s)")
    print(
        f"student alone (decoder fwd+bwd + its share of the loss + AdamW, {alone:.1f} ms): "
        f"MFU {N * fpt / (alone * 1e-3) / peak:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
