"""Where the IOMM-B generator's forward + backward time goes, whole model, by kernel (issue 7).

    python benchmarks/bench_generator_kernels.py --out DIR                      # CUDA (gpu_check stage 'genkernels')
    python benchmarks/bench_generator_kernels.py --out DIR --variants base,bhsd # compare formulations
    python benchmarks/bench_generator_kernels.py --out DIR --dry-run            # CPU, tiny config, eager
    python benchmarks/bench_generator_kernels.py --out DIR --config configs/xl.yaml --micro-batch 8 \
        --variants base,unfused                                                 # IOMM-XL (S3-DiT) instead

The case `iomm-profile --scope generator --compile on` times (configs/b.yaml: FLUX MM-DiT,
hidden 1536, 10 double + 21 single blocks, 512 px = 1024 image + 256 condition tokens; fp32
parameters + bf16 autocast; blocks compiled; gradients set to None after each step, as the
trainer's zero_grad does), forward + backward only. For each variant:

  * fwd+bwd seconds: median of --steps CUDA-event timed steps, and fbMFU (model FLOPs of
    profiling/flops.py over that time, against the device's dense bf16 peak);
  * under torch.profiler, two steps: the sum of kernel time against the wall time between the
    first and last kernel (what is left is the GPU idle between kernels: launch gaps, host
    stalls), kernel time by category (matmul / attention / norm / other), the top kernels and
    the aten ops that launched most device time.

Variants (formulations tried against the model code; one that wins moves into the model):
  base        the code as it is (with IOMM_NORM_ROPE_CONFIG when set: gpu_check sets the sweep's best)
  shipped     the fused norm + RoPE kernel at its built-in rows x warps per program
  unfused     IOMM_FUSED_KERNELS=0: q/k RMSNorm + RoPE as PyTorch code that inductor fuses,
              instead of the Triton kernel of models/fused_norm_rope.py
  bhsd        q, k, v handed to SDPA contiguous in [B, H, S, D] (the layout cuDNN's kernels
              keep), instead of transposed views of [B, S, H, D] (on torch 2.11 + H200 this hit
              "an illegal memory access" in the compiled generator, ninth session)
  maxpw       torch._inductor.config.max_autotune_pointwise (autotuned elementwise/reduction
              launch configs)
  cudagraphs  the compiled blocks under CUDA graphs (mode reduce-overhead): no launch gaps
Each variant runs in its own process (a CUDA fault in one cannot take the others with it).
Writes DIR/genkernels.md and DIR/genkernels.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_kernels import category, write_csv  # noqa: E402

VARIANTS = ("base", "shipped", "unfused", "bhsd", "maxpw", "cudagraphs")


def _sdpa_bhsd(q, k, v, key_padding_mask=None, backend="auto"):
    import torch.nn.functional as F

    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                         v.transpose(1, 2).contiguous(), attn_mask=mask)
    return out.transpose(1, 2)


@contextlib.contextmanager
def variant(name: str):
    """Apply one formulation for the duration of a case."""
    from torch._inductor import config as inductor_config

    from iomm_scale.models import flux_mmdit

    saved_attention, saved_pw = flux_mmdit.attention, inductor_config.max_autotune_pointwise
    saved_env = {k: os.environ.get(k) for k in ("IOMM_FUSED_KERNELS",)}
    saved_config = None
    try:
        if name == "unfused":
            os.environ["IOMM_FUSED_KERNELS"] = "0"
        elif name == "shipped":  # the built-in norm + RoPE configuration, whatever IOMM_NORM_ROPE_CONFIG says
            from iomm_scale.models import fused_norm_rope as fnr

            saved_config = (fnr.FWD_ROWS, fnr.FWD_WARPS, fnr.BWD_ROWS, fnr.BWD_WARPS)
            fnr.FWD_ROWS, fnr.FWD_WARPS, fnr.BWD_ROWS, fnr.BWD_WARPS = fnr.SHIPPED_CONFIG
        elif name == "bhsd":
            flux_mmdit.attention = _sdpa_bhsd
        elif name == "maxpw":
            inductor_config.max_autotune_pointwise = True
        yield
    finally:
        flux_mmdit.attention, inductor_config.max_autotune_pointwise = saved_attention, saved_pw
        if saved_config is not None:
            fnr.FWD_ROWS, fnr.FWD_WARPS, fnr.BWD_ROWS, fnr.BWD_WARPS = saved_config
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_events(prof, device_type: str):
    """(name, start_us, duration_us) of every device kernel (or CPU leaf op on a dry run)."""
    out = []
    for ev in prof.events():
        if device_type == "cuda":
            if getattr(ev, "device_type", None) is None or ev.device_type.name != "CUDA":
                continue
        elif not ev.name.startswith("aten::"):
            continue
        iv = ev.time_range
        out.append((ev.name, iv.start, iv.end - iv.start))
    return out


def run_variant(cfg, name: str, b: int, steps: int, device: torch.device, peak: float | None) -> tuple[dict, str]:
    from torch import _dynamo
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from iomm_scale.models.registry import build_generator
    from iomm_scale.profiling.flops import condition_lengths, generator_flops, latent_hw
    from iomm_scale.train.compile import compile_blocks

    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        gen = build_generator(cfg.model.generator.family, cfg.generator).train()
    _dynamo.reset()
    if cuda:
        if name == "cudagraphs":
            for blk in gen.blocks():
                blk.compile(mode="reduce-overhead", dynamic=False)
        else:
            compile_blocks(gen)
    cond_len = condition_lengths(cfg)["generator"]
    h, w = latent_hw(cfg)
    g = torch.Generator(device="cpu").manual_seed(0)
    x_t = torch.randn(b, cfg.generator.latent_channels, h, w, generator=g).to(device)
    cond = torch.randn(b, cond_len, cfg.generator.context_dim, generator=g).to(device)
    target = torch.randn_like(x_t)
    t = torch.rand(b, generator=g).to(device)
    flops = generator_flops(cfg.model.generator.family, cfg.generator, b, (h, w), cond_len, cond_grad=False).total
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    params = list(gen.parameters())

    def fwd_bwd():
        with autocast:
            out = gen(x_t, t, cond)
        torch.nn.functional.mse_loss(out.float(), target).backward()
        for p in params:
            p.grad = None

    t0 = time.perf_counter()
    with variant(name):
        from iomm_scale.models.fused_norm_rope import config_text

        norm_rope_config = config_text() if name != "unfused" else "-"  # what this variant runs
        for _ in range(3):
            fwd_bwd()
        if cuda:
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            if cuda:
                a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fwd_bwd()
                z.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(z) / 1e3)
            else:
                c = time.perf_counter()
                fwd_bwd()
                times.append(time.perf_counter() - c)
        prof_steps = 2
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(prof_steps):
                fwd_bwd()
            if cuda:
                torch.cuda.synchronize()
    s = sorted(times)[len(times) // 2]
    kernels = kernel_events(prof, device.type)
    busy = sum(d for _, _, d in kernels)
    span = (max(st + d for _, st, d in kernels) - min(st for _, st, _ in kernels)) if kernels else 0.0
    by_name: dict[str, float] = {}
    for n, _, d in kernels:
        by_name[n] = by_name.get(n, 0.0) + d / prof_steps
    by_cat: dict[str, float] = {}
    for n, us in by_name.items():
        by_cat[category(n)] = by_cat.get(category(n), 0.0) + us
    # aten ops by the device time of the kernels they launched
    ops = []
    for ev in prof.key_averages():
        if getattr(ev, "device_type", None) == DeviceType.CPU and ev.key.startswith("aten::"):
            dev_us = getattr(ev, "device_time_total", None)
            dev_us = getattr(ev, "cuda_time_total", 0.0) if dev_us is None else dev_us
            if dev_us > 0:
                ops.append((ev.key, dev_us / prof_steps, ev.count // prof_steps))
    ops.sort(key=lambda r: -r[1])
    row = {"variant": name, "micro_batch": b, "fwd_bwd_s": s, "fwd_bwd_min_s": min(times), "warmup_s": warm_s,
           "tflops_per_s": flops / s / 1e12, "fbMFU": (flops / s / 1e12 / peak) if peak else None,
           "kernel_ms_per_step": busy / prof_steps / 1e3, "span_ms_per_step": span / prof_steps / 1e3,
           "idle_share": (1 - busy / span) if span else None, "kernels_per_step": len(kernels) // prof_steps,
           "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "norm_rope_config": norm_rope_config}
    for c in ("matmul", "attention", "norm", "other"):
        row[f"{c}_ms"] = by_cat.get(c, 0.0) / 1e3
    total = sum(by_name.values()) or 1.0
    lines = [f"### {name} (norm+rope rows/warps {row['norm_rope_config']}): fwd+bwd {s * 1e3:.1f} ms "
             f"(min {min(times) * 1e3:.1f}), "
             + (f"fbMFU {row['fbMFU']:.1%}, " if peak else "")
             + f"{row['kernels_per_step']} kernels/step, kernel time {row['kernel_ms_per_step']:.1f} ms of a "
             f"{row['span_ms_per_step']:.1f} ms span (idle {row['idle_share']:.1%})", "",
             "| category | ms/step | share |", "|---|---|---|"]
    lines += [f"| {c} | {by_cat.get(c, 0.0) / 1e3:.2f} | {by_cat.get(c, 0.0) / total:.1%} |"
              for c in ("matmul", "attention", "norm", "other")]
    lines += ["", "| kernel | category | ms/step | share |", "|---|---|---|---|"]
    lines += [f"| `{n[:100]}` | {category(n)} | {us / 1e3:.3f} | {us / total:.1%} |"
              for n, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:30]]
    lines += ["", "| aten op (device time of its kernels, self + children) | ms/step | calls/step |", "|---|---|---|"]
    lines += [f"| `{k}` | {us / 1e3:.3f} | {c} |" for k, us, c in ops[:25]]
    fwd_bwd = prof = None  # noqa: F841 - free the model before the next variant
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_results")
    ap.add_argument("--config", default=None, help="default configs/b.yaml (--dry-run: configs/tiny.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. for configs/xl.yaml (S3-DiT) a smaller generator")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", default="base,bhsd")
    ap.add_argument("--dry-run", action="store_true", help="CPU, configs/tiny.yaml, eager, micro-batch 2")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a child's result for its parent
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")

    from iomm_scale.config import load_config
    from iomm_scale.profiling.mfu import peak_tflops_for

    over = ["data.source=builtin", "data.webdataset=null", *args.set]
    args.config = args.config or ("configs/tiny.yaml" if args.dry_run else "configs/b.yaml")
    if args.dry_run:
        device, cfg, b, steps = torch.device("cpu"), load_config(args.config, over), 2, 1
    else:
        assert torch.cuda.is_available(), "needs CUDA (or --dry-run)"
        device, cfg, b, steps = torch.device("cuda"), load_config(args.config, over), args.micro_batch, args.steps
    peak = peak_tflops_for(device) if device.type == "cuda" else None
    rows, sections = [], []
    if len(names) > 1:  # one process per variant
        import json
        import subprocess
        import tempfile

        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, os.path.abspath(__file__), "--out", tmp, "--config", args.config,
                       "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--variants", name,
                       "--json"] + (["--dry-run"] if args.dry_run else []) + [f"--set={o}" for o in args.set]
                r = subprocess.run(cmd, capture_output=True, text=True)
                print(r.stdout[-3000:], r.stderr[-3000:] if r.returncode else "", flush=True)
                try:
                    with open(os.path.join(tmp, "genkernels.json")) as f:
                        got = json.load(f)
                    rows += got["rows"]
                    sections += got["sections"]
                except OSError:
                    rows.append({"variant": name, "micro_batch": b, "error": f"process exited {r.returncode}"})
                    sections.append(f"### {name}: process exited {r.returncode}: {r.stderr[-300:]}")
    for name in names if len(names) == 1 else []:
        try:
            row, text = run_variant(cfg, name, b, steps, device, peak)
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile is recorded
            row, text = {"variant": name, "micro_batch": b, "error": f"{type(e).__name__}: {e}"[:300]}, \
                f"### {name}: failed: {type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        rows.append(row)
        sections.append(text)
    os.makedirs(args.out, exist_ok=True)
    if args.json:
        import json

        with open(os.path.join(args.out, "genkernels.json"), "w") as f:
            json.dump({"rows": rows, "sections": sections}, f)
        return 0
    write_csv(os.path.join(args.out, "genkernels.csv"), rows)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    with open(os.path.join(args.out, "genkernels.md"), "w") as f:
        f.write(f"{cfg.model.generator.family} generator forward + backward ({args.config}"
                + (f" with {' '.join(args.set)}" if args.set else "")
                + f"), micro-batch {b}, on {name}, torch {torch.__version__}\n\n" + "\n\n".join(sections) + "\n")
    print("wrote", os.path.join(args.out, "genkernels.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
