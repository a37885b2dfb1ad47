"""Training throughput, model TFLOP/s, MFU and peak memory (issue 7).

    python benchmarks/bench_throughput.py [--record]          # CPU: tiny + B-shaped (reduced) configs
    python benchmarks/bench_throughput.py --memory [--record]  # CPU: planner vs measured peak memory
    python benchmarks/bench_throughput.py --memory --zero3 [--record]  # the same, DeepSpeed ZeRO-3 on 2 processes
    python benchmarks/bench_throughput.py --gpu-blocks --out DIR   # CUDA: IOMM-B blocks, bf16 (gpu_check.sh)

CPU mode: the trainer's step without data loading (IOMMModel.loss + backward + clip +
AdamW (+ EMA)) via iomm_scale.profiling.profile.run_case, for
  * configs/tiny.yaml as shipped (micro-batch 16, 32 px), and
  * "B-shaped (reduced)": IOMM-B's block design at 512 px -- FLUX double + single blocks,
    head_dim 128, mlp ratio 4, 1024 image tokens (pixel VAE, factor 8, packed 2x2) and 256
    RQA query tokens -- reduced to hidden 256 (2 heads), 1 double + 2 single blocks, with
    the tiny random MLLM;
each with activation checkpointing none / full. Peak memory is the CPU peak RSS above the
pre-build level (see profiling/profile.py), beside the memory planner's estimate.
`--record` appends the table to benchmarks/RESULTS.md under "## Throughput and profiling
(issue 7)".

GPU mode (`--gpu-blocks`): one FLUX double-stream block and one single-stream block at
IOMM-B's width (hidden 1536 = 12 x 128 heads, mlp 6144), 1024 image + 256 condition tokens,
bf16 parameters and activations, forward + backward timed with CUDA events, for each
attention backend available (sdpa; flash when flash-attn imports). FLOPs: the analytic
block formula (model FLOPs); MFU against the device's dense bf16 peak. A FlopCounterMode
pass cross-checks the formula on the real kernels.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTION = "## Throughput and profiling (issue 7)"


# ------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------
def b_shaped_cfg(batch: int = 1):
    import yaml

    from iomm_scale.config import from_dict

    raw = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))
    raw["model"]["generator"] = dict(family="flux", in_channels=768, num_layers=1, num_single_layers=2, num_heads=2,
                                     head_dim=128, context_dim=64, pooled_dim=64, axes_dims_rope=[16, 56, 56],
                                     attention_backend="sdpa")
    raw["model"]["conditioner"]["rqa"] = {"num_queries": 256, "num_layers": 2, "num_heads": 4}
    raw["model"]["vae"] = {"type": "pixel", "pixel_factor": 8}
    raw["data"].update(resolution=512, batch_size=batch)
    raw["train"].update(progress_bar=False, num_samples=0)
    return from_dict(raw, "B-shaped (reduced): FLUX hidden 256, 1+2 blocks, 512 px (1024 + 256 tokens)")


def cpu_rows(steps: int, warmup: int, threads: int):
    import torch

    from iomm_scale.config import load_config
    from iomm_scale.profiling.profile import Case, release_freed_memory, run_case, warm_up

    torch.set_num_threads(threads)
    release_freed_memory()
    tiny = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["train.progress_bar=false", "train.num_samples=0"])
    warm_up(tiny, "step", False)
    out = []
    for label, cfg, mbs in (("tiny", tiny, [16]), ("B-shaped (reduced)", b_shaped_cfg(), [1, 2])):
        for mb in mbs:
            for ck in ("none", "full"):
                row = run_case(cfg, Case(mb, ck, "sdpa", False), scope="step", steps=steps, warmup=warmup, device="cpu")
                row["config"] = label
                out.append(row)
                print(fmt_cpu_row(row), flush=True)
    return out


CPU_HEAD = ("| config | micro-batch | ckpt | step s (median / min) | CPU s | samples/s | image tok/s | "
            "model GFLOP/step | GFLOP/s | peak MiB (RSS) | planned MiB | act saved MiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def fmt_cpu_row(r) -> str:
    if not r.get("status", "").startswith("ok"):
        return f"| {r.get('config')} | {r['micro_batch']} | {r['checkpointing']} | {r.get('status')} |"
    return (f"| {r['config']} | {r['micro_batch']} | {r['checkpointing']} | {r['step_s']:.3f} / {r['step_min_s']:.3f} "
            f"| {r['cpu_s']:.3f} | {r['samples_per_s']:.2f} "
            f"| {r['image_tokens_per_s']:.0f} | {1000 * r['tflops_per_step']:.2f} | {1000 * r['tflops_per_s']:.2f} "
            f"| {_f(None if r['peak_mem_GiB'] is None else r['peak_mem_GiB'] * 1024, '.0f')} "
            f"| {_f(None if r.get('plan_GiB') is None else r['plan_GiB'] * 1024, '.0f')} "
            f"| {r['act_saved_GiB'] * 1024:.1f} |")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}"


def record(rows, command: str, load_before, load_after, seconds: float) -> None:
    import torch

    lines = [f"{datetime.date.today().isoformat()}. Machine: {machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} intra-op thread(s); shared with other jobs (load average "
             f"{load_before[0]:.1f} before, {load_after[0]:.1f} after), so wall times are upper bounds; CPU s "
             f"(process time of the step, all threads) is less sensitive to the other load. "
             f"Wall time {seconds:.0f} s. Command:", "", f"    {command}", "", CPU_HEAD,
             *[fmt_cpu_row(r) for r in rows], "",
             "- GFLOP counts are the analytic model FLOPs of the whole step (profiling/flops.py; "
             "checked against FlopCounterMode in tests/profiling). No MFU on CPU (no peak table entry). "
             "B-shaped (reduced): FLUX hidden 256 (2 x 128 heads), 1 double + 2 single blocks, 512 px through a "
             "pixel VAE (factor 8) = 1024 image tokens, 256 RQA queries, tiny random InternVL.",
             "- Peak MiB: peak RSS of one untimed step (after the warm-up step) above the RSS before the "
             "model was built (glibc returns freed blocks; /proc/self/clear_refs reset); the timed steps run "
             "with the fast allocator setting. Planned: profiling/memory.py for the same case (fp32, single "
             "process).",
             "- act saved: bytes autograd saved in one forward outside checkpointed blocks "
             "(saved_tensors_hooks; checkpointed blocks keep only their inputs, which this count does "
             "not see).", ""]
    append_to_section("\n".join(lines))


def append_to_section(block: str) -> None:
    """Add `block` at the end of RESULTS.md's SECTION (created at the end of the file if missing)."""
    path = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    text = open(path).read() if os.path.exists(path) else ""
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        body, tail = (rest, "") if nxt < 0 else (rest[:nxt], rest[nxt:])
        text = head + SECTION + body.rstrip("\n") + "\n\n" + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + block
    open(path, "w").write(text)
    print(f"recorded in {path}")


# ------------------------------------------------------------------------------------------
# GPU: IOMM-B blocks
# ------------------------------------------------------------------------------------------
def gpu_blocks(out_dir: str, batches=(4, 8), iters: int = 20, warmup: int = 5, dry_run: bool = False) -> list[dict]:
    """dry_run: the same code on CPU at a toy size (checks the script without a GPU)."""
    import torch

    from iomm_scale.models.attention import flash_available, rope_angles
    from iomm_scale.models.flux_mmdit import DoubleStreamBlock, FluxConfig, SingleStreamBlock
    from iomm_scale.profiling.flops import COUNTER_ATTENTION_BACKWARD, flop_counter, flux_block_flops
    from iomm_scale.profiling.mfu import peak_tflops_for

    if dry_run:
        dev, dtype, heads, n_img, n_cond, batches, iters, warmup = torch.device("cpu"), torch.float32, 2, 64, 16, (2,), 2, 1
        peak, name = None, "cpu (dry run)"
    else:
        assert torch.cuda.is_available(), "--gpu-blocks needs CUDA"
        dev, dtype, heads, n_img, n_cond = torch.device("cuda"), torch.bfloat16, 12, 1024, 256
        peak, name = peak_tflops_for(dev), torch.cuda.get_device_name()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    backends = ["sdpa"] + (["flash"] if flash_available() else [])
    for backend in backends:
        cfg = FluxConfig(in_channels=64, num_layers=1, num_single_layers=1, num_heads=heads, head_dim=128,
                         context_dim=1536, pooled_dim=1536, attention_backend=backend)
        d = cfg.hidden_size
        torch.manual_seed(0)
        blocks = {"double": DoubleStreamBlock(cfg), "single": SingleStreamBlock(cfg)}
        side = int(n_img ** 0.5)
        ids = torch.cat([torch.zeros(n_cond, 3), torch.stack([torch.zeros(n_img), torch.arange(n_img) // side,
                                                              torch.arange(n_img) % side], -1)]).to(dev)
        cos, sin = rope_angles(ids, cfg.axes_dims_rope, cfg.rope_theta)
        for kind, block in blocks.items():
            block = block.to(dev, dtype)
            for b in batches:
                row = {"device": name, "block": kind, "backend": backend, "batch": b, "tokens": n_img + n_cond}
                try:
                    def make():
                        g = torch.Generator(device=dev).manual_seed(1)
                        mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=g).requires_grad_()
                        temb = mk(b, d)
                        if kind == "double":
                            return (mk(b, n_img, d), mk(b, n_cond, d), temb, (cos, sin), None)
                        return (mk(b, n_img + n_cond, d), temb, (cos, sin), None)

                    args = make()
                    outs = block(*args)
                    outs = outs if isinstance(outs, tuple) else (outs,)
                    grads = [torch.randn_like(o) for o in outs]

                    def fwd_bwd():
                        o = block(*args)
                        o = o if isinstance(o, tuple) else (o,)
                        torch.autograd.backward(o, grads)

                    for _ in range(warmup):
                        fwd_bwd()
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        fwd_bwd()
                    sync()
                    sec = (time.perf_counter() - t0) / iters
                    led = flux_block_flops(cfg, kind, b, n_img, n_cond)
                    with flop_counter() as fc:
                        fwd_bwd()
                    counter_led = flux_block_flops(cfg, kind, b, n_img, n_cond,
                                                   attention_backward=COUNTER_ATTENTION_BACKWARD)
                    tflops = led.total / sec / 1e12
                    row.update(ms=1000 * sec, model_tflop=led.total / 1e12, tflops_per_s=tflops,
                               mfu=None if not peak else tflops / peak, peak_tflops=peak,
                               counter_vs_formula=fc.get_total_flops() / counter_led.total, status="ok")
                except Exception as e:  # noqa: BLE001 - record and go on
                    row["status"] = f"error: {type(e).__name__}: {e}"[:200]
                rows.append(row)
                print(row, flush=True)
                args = outs = grads = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    os.makedirs(out_dir, exist_ok=True)
    keys = ["device", "block", "backend", "batch", "tokens", "ms", "model_tflop", "tflops_per_s", "mfu", "peak_tflops",
            "counter_vs_formula", "status"]
    with open(os.path.join(out_dir, "blocks.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, "blocks.md"), "w") as f:
        f.write(f"IOMM-B blocks (hidden {heads * 128}, {heads} x 128 heads, {n_img} image + {n_cond} condition tokens), "
                f"{str(dtype).replace('torch.', '')}, "
                f"forward + backward, {iters} timed iterations after {warmup} warm-up, on {name} "
                f"(dense bf16 peak {peak} TFLOP/s)\n\n")
        f.write("| block | attention | batch | ms / fwd+bwd | model TFLOP | TFLOP/s | MFU | counter / formula |\n"
                "|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            if r["status"] != "ok":
                f.write(f"| {r['block']} | {r['backend']} | {r['batch']} | {r['status']} | | | | |\n")
                continue
            mfu = "-" if r["mfu"] is None else "%.1f%%" % (100 * r["mfu"])
            f.write(f"| {r['block']} | {r['backend']} | {r['batch']} | {r['ms']:.2f} | {r['model_tflop']:.3f} | "
                    f"{r['tflops_per_s']:.1f} | {mfu} | {r['counter_vs_formula']:.3f} |\n")
    return rows


def memory_rows(cases=("flux:none", "flux:full", "flux:every_k", "s3dit:none", "s3dit:full", "qwen_mmdit:none",
                        "qwen_mmdit:full", "flux:none:all", "qwen_mmdit:none:all")):
    """The planner against measured peak memory (tests/profiling/_measure_memory.py: the
    Trainer's step, fp32, CPU peak RSS) on the small configs of tests/profiling/_memory_cases.py;
    `FAMILY:MODE:all`: train.compile + compile_mllm (backend aot_eager_decomp_partition)."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "tests", "profiling"))
    from _memory_cases import make_cfg

    from iomm_scale.profiling.memory import Layout, plan_memory

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    import subprocess

    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "profiling", "_measure_memory.py"), *cases],
                         capture_output=True, text=True, env=env, check=True)
    rows = []
    for line in out.stdout.splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        cfg = make_cfg(r["family"])
        plan = plan_memory(cfg, Layout(micro_batch=cfg.data.batch_size, checkpointing=r["checkpointing"], every_k=2,
                                       compile=r.get("compile", "off")), device="cpu")
        r.update(plan=plan.allocated, acts=plan.component("activations"))
        rows.append(r)
    return rows


MEM_HEAD = ("| generator (hidden 192, 256 + 16 tokens, micro-batch 4) | checkpointing | measured peak MiB | planned MiB "
            "| planned / measured |\n|---|---|---|---|---|")


def fmt_mem_row(r) -> str:
    mode = "every 2nd block" if r["checkpointing"] == "every_k" else r["checkpointing"]
    if r.get("compile", "off") != "off":
        mode += f", compiled ({r['compile']})"
    return (f"| {r['family']} | {mode} | {r['peak'] / 2**20:.1f} | {r['plan'] / 2**20:.1f} | "
            f"{r['plan'] / r['peak']:.3f} |")


def record_memory(rows, command: str, load_before, load_after) -> None:
    block = "\n".join([
        f"Memory planner against measured peak memory, {datetime.date.today().isoformat()}, {machine()} "
        f"(load average {load_before[0]:.1f} -> {load_after[0]:.1f}). Command:", "", f"    {command}", "",
        "Each case: the Trainer's own train_step (fp32, AdamW, EMA, tiny random InternVL, pixel VAE at 128 px), "
        "peak RSS of the second step above the RSS before the model was built (tests/profiling/_measure_memory.py); "
        "planned: profiling/memory.py with the same layout.", "", MEM_HEAD, *map(fmt_mem_row, rows), ""])
    append_to_section(block)


ZERO3_CASES = ("none", "full", "none+small")


def memory_zero3_rows(cases=ZERO3_CASES):
    """The planner against the measured per-rank peak of a real 2-process DeepSpeed ZeRO-3 step
    (tests/profiling/_measure_memory_zero3.py: gloo, CPU, fp32, AdamW, the launchers' wiring;
    "+small": DeepSpeed's ZeRO-3 buffers set below the model's size)."""
    import tempfile

    sys.path.insert(0, os.path.join(ROOT, "tests", "profiling"))
    from _memory_cases import SMALL_BUFFERS, start_zero3, zero3_plan, zero3_plans_while_running, zero3_results

    def make_plans():
        cache: dict = {}
        return {case: zero3_plan(case.partition("+")[0], cache,
                                 deepspeed=dict(SMALL_BUFFERS.values()) if case.endswith("+small") else None)
                for case in cases}

    with tempfile.TemporaryDirectory(prefix="iomm_zero3_") as tmp:
        out = os.path.join(tmp, "zero3.json")
        proc = start_zero3(out, cases)
        plans = zero3_plans_while_running(proc, make_plans)
        rows = zero3_results(proc, out)
    for r in rows:
        plan = plans[r["case"]]
        r.update(plan=plan.allocated, plan_static=sum(b for n, b, _ in plan.rows if n not in (
            "zero3 gathered params", "activations", "recompute + bwd working set")))
    return rows


MEM3_HEAD = ("| layout | checkpointing | DeepSpeed ZeRO-3 buffers | rank | measured peak MiB | planned MiB | "
             "planned / measured | static after step 1 MiB (measured / planned) |\n|---|---|---|---|---|---|---|---|")


def fmt_mem3_row(r) -> str:
    buffers = ("defaults (max live 1e9, reuse 1e9, prefetch 5e7, reduce 5e8 el.)" if r["variant"] == "default" else
               f"max live {r['max_live_parameters']:.0e}, reuse {r['max_reuse_distance']:.0e}, prefetch "
               f"{r['prefetch_bucket_size']:.0e}, reduce {r['reduce_bucket_size']:.0e} el.")
    return (f"| ZeRO-3, dp {r['dp']} | {r['checkpointing']} | {buffers} | {r['rank']} | {r['peak'] / 2**20:.1f} | "
            f"{r['plan'] / 2**20:.1f} | {r['plan'] / r['peak']:.3f} | {r['static'] / 2**20:.1f} / "
            f"{r['plan_static'] / 2**20:.1f} |")


def record_memory_zero3(rows, command: str, load_before, load_after) -> None:
    block = "\n".join([
        f"Memory planner against measured per-rank peak memory under DeepSpeed ZeRO-3 on 2 processes, "
        f"{datetime.date.today().isoformat()}, {machine()} (load average {load_before[0]:.1f} -> {load_after[0]:.1f}). "
        "Command:", "", f"    {command}", "",
        "One torchrun launch of 2 processes (gloo; tests/profiling/_measure_memory_zero3.py): tiny random InternVL, "
        "RQA, FLUX hidden 256 (2 double + 2 single blocks; 7.2M trainable parameters), pixel VAE at 128 px, "
        "micro-batch 2 per rank, fp32, AdamW, no EMA, built and handed to ParallelRuntime.build as the launchers do "
        "(ZeRO-3 over dp 2, DeepSpeed's default ZeRO-3 settings unless stated); peak RSS of the second step (the first "
        "with DeepSpeed's recorded module trace) above the RSS before the model was built, per rank. Planned: "
        "profiling/memory.py, Layout(dp=2, zero_stage=3), device cpu, the same DeepSpeed settings. Static: the resident "
        "set after the first step vs the planned parameters, gradients, optimizer states, persistent parameters and "
        "gradient bucket.", "", MEM3_HEAD, *map(fmt_mem3_row, rows), ""])
    append_to_section(block)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help="append the CPU table to benchmarks/RESULTS.md")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-blocks", action="store_true")
    ap.add_argument("--memory", action="store_true", help="the memory planner against measured CPU peaks")
    ap.add_argument("--zero3", action="store_true", help="with --memory: DeepSpeed ZeRO-3 on 2 processes instead")
    ap.add_argument("--dry-run", action="store_true", help="with --gpu-blocks: toy size on CPU (tests the script)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_results"))
    args = ap.parse_args(argv)
    if args.gpu_blocks:
        gpu_blocks(args.out, dry_run=args.dry_run)
        return
    if args.memory and args.zero3:
        load0 = os.getloadavg()
        rows = memory_zero3_rows()
        print(MEM3_HEAD)
        for r in rows:
            print(fmt_mem3_row(r))
        if args.record:
            record_memory_zero3(rows, "python benchmarks/bench_throughput.py --memory --zero3 --record", load0,
                                os.getloadavg())
        return
    if args.memory:
        load0 = os.getloadavg()
        rows = memory_rows()
        print(MEM_HEAD)
        for r in rows:
            print(fmt_mem_row(r))
        if args.record:
            record_memory(rows, "python benchmarks/bench_throughput.py --memory --record", load0, os.getloadavg())
        return
    load0 = os.getloadavg()
    t0 = time.time()
    rows = cpu_rows(args.steps, args.warmup, args.threads)
    print(CPU_HEAD)
    for r in rows:
        print(fmt_cpu_row(r))
    if args.record:
        cmd = "python benchmarks/bench_throughput.py --record" + "".join(
            f" --{k} {v}" for k, v in (("steps", args.steps), ("warmup", args.warmup), ("threads", args.threads)))
        record(rows, cmd, load0, os.getloadavg(), time.time() - t0)


if __name__ == "__main__":
    main(sys.argv[1:])
