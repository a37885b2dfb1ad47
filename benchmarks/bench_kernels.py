"""Where the time of an IOMM-B block's forward + backward goes, by kernel (issue 7).

    python benchmarks/bench_kernels.py --out DIR            # on a CUDA machine (gpu_check.sh stage 'kernels')
    python benchmarks/bench_kernels.py --out DIR --dry-run  # the same code on CPU at a toy size

One FLUX double-stream and one single-stream block at IOMM-B shapes (hidden 1536, 12 x 128 heads,
1024 image + 256 condition tokens, micro-batch 8, bf16 weights and inputs), eager and
torch.compile'd. torch.profiler records every device kernel of 5 timed iterations; kernels are
grouped into matrix products, attention, normalisation and the rest (elementwise: modulation,
RoPE, GELU, residual adds, casts, copies), each with its share of the kernel time, and the top
kernels are listed. The matrix products' share tells how far the block is from what matmuls alone
would give: MFU <= (matmul FLOP share) x (matmul efficiency) / (matmul time share).
Writes DIR/kernels.md and DIR/kernels.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name fragments -> category; first match wins (kernel names on CUDA, aten op names on CPU)
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("norm", ("layer_norm", "layernorm", "rms", "norm_kernel")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def write_csv(path: str, rows: list[dict]) -> None:
    """Rows to CSV; columns in first-seen order over all rows (a failed case has fewer)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def profile_block(block, args, grads, iters: int, device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    leaves = [*block.parameters(), *(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)]

    def fwd_bwd():
        o = block(*args)
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads)
        for t in leaves:  # as the trainer's zero_grad(set_to_none=True): no accumulation kernels
            t.grad = None

    for _ in range(3):  # warm-up (and compilation)
        fwd_bwd()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(iters):
            fwd_bwd()
        if device.type == "cuda":
            torch.cuda.synchronize()
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        if device.type == "cuda":  # device kernels only: a CPU op's device time repeats its kernels'
            if getattr(ev, "device_type", None) != DeviceType.CUDA:
                continue
            us = getattr(ev, "self_device_time_total", None)
            us = ev.self_cuda_time_total if us is None else us
            if us <= 0:
                continue
        else:  # CPU dry run: leaf aten ops only (self time), so nothing is counted twice
            us = ev.self_cpu_time_total
            if us <= 0 or not ev.key.startswith("aten::"):
                continue
        totals[ev.key] = totals.get(ev.key, 0.0) + us / iters
    return totals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_results")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy size, eager only")
    args = ap.parse_args(argv)

    from iomm_scale.models.attention import rope_angles
    from iomm_scale.models.flux_mmdit import DoubleStreamBlock, FluxConfig, SingleStreamBlock
    from iomm_scale.profiling.flops import flux_block_flops

    if args.dry_run:
        dev, dtype, heads, n_img, n_cond, b, modes = torch.device("cpu"), torch.float32, 2, 64, 16, 2, ("eager",)
    else:
        assert torch.cuda.is_available(), "needs CUDA (or --dry-run)"
        dev, dtype, heads, n_img, n_cond, b, modes = (torch.device("cuda"), torch.bfloat16, 12, 1024, 256,
                                                      args.batch, ("eager", "compiled"))
    cfg = FluxConfig(in_channels=64, num_layers=1, num_single_layers=1, num_heads=heads, head_dim=128,
                     context_dim=heads * 128, pooled_dim=heads * 128, attention_backend="sdpa")
    d = cfg.hidden_size
    side = int(n_img ** 0.5)
    ids = torch.cat([torch.zeros(n_cond, 3), torch.stack([torch.zeros(n_img), torch.arange(n_img) // side,
                                                          torch.arange(n_img) % side], -1)]).to(dev)
    rope = rope_angles(ids, cfg.axes_dims_rope, cfg.rope_theta)
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=g).requires_grad_()  # noqa: E731
    rows, sections = [], []
    for kind in ("double", "single"):
        torch.manual_seed(0)
        block = (DoubleStreamBlock(cfg) if kind == "double" else SingleStreamBlock(cfg)).to(dev, dtype)
        temb = mk(b, d)
        inputs = ((mk(b, n_img, d), mk(b, n_cond, d), temb, rope, None) if kind == "double"
                  else (mk(b, n_img + n_cond, d), temb, rope, None))
        outs = block(*inputs)
        grads = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
        del outs
        model_flop = flux_block_flops(cfg, kind, b, n_img, n_cond).total
        for mode in modes:
            run = torch.compile(block) if mode == "compiled" else block
            totals = profile_block(run, inputs, grads, args.iters, dev)
            total_us = sum(totals.values())
            by_cat: dict[str, float] = {}
            for name, us in totals.items():
                by_cat[category(name)] = by_cat.get(category(name), 0.0) + us
            row = {"block": kind, "mode": mode, "batch": b, "kernel_ms": total_us / 1e3,
                   "kernel_tflops_per_s": model_flop / (total_us * 1e-6) / 1e12 if total_us else None}
            for cat in ("matmul", "attention", "norm", "other"):
                row[f"{cat}_ms"] = by_cat.get(cat, 0.0) / 1e3
                row[f"{cat}_share"] = by_cat.get(cat, 0.0) / total_us if total_us else None
            rows.append(row)
            print(row, flush=True)
            top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
            lines = [f"### {kind} block, {mode}: {total_us / 1e3:.2f} ms of kernels per fwd+bwd "
                     f"({row['kernel_tflops_per_s']:.1f} model TFLOP/s over kernel time)", "",
                     "| kernel | category | ms | share |", "|---|---|---|---|"]
            lines += [f"| `{n[:90]}` | {category(n)} | {us / 1e3:.3f} | {us / total_us:.1%} |" for n, us in top]
            sections.append("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "kernels.csv"), rows)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)"
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(f"IOMM-B blocks, micro-batch {b}, {n_img}+{n_cond} tokens, {str(dtype).replace('torch.', '')}, "
                f"fwd+bwd kernel time by category on {name} (torch {torch.__version__}, torch.profiler, "
                f"mean of {args.iters} iterations)\n\n")
        f.write("| block | mode | kernel ms | model TFLOP/s | matmul | attention | norm | other |\n|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['block']} | {r['mode']} | {r['kernel_ms']:.2f} | {r['kernel_tflops_per_s']:.1f} | "
                    + " | ".join(f"{r[c + '_ms']:.2f} ms ({r[c + '_share']:.0%})"
                                 for c in ("matmul", "attention", "norm", "other")) + " |\n")
        f.write("\n" + "\n\n".join(sections) + "\n")
    print("wrote", os.path.join(args.out, "kernels.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
