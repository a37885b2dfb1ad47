"""ZeRO-3 memory per rank and activation-checkpointing memory / time, on CPU.

    python benchmarks/bench_zero_memory.py [--record]      # runs everything, prints a table
                                                            # (--record appends to RESULTS.md)
    python benchmarks/bench_zero_memory.py --parts isolated,c --zero-time-worlds 1,2,4   # time only

Part A (ZeRO-3 scaling): a FluxMMDiT (~25M params) trained one AdamW step by a DeepSpeed
ZeRO-3 engine under torchrun with 1, 2 and 4 processes (gloo). Per rank we count the bytes
of every distinct tensor storage the engine holds for parameters, gradients and optimizer
state: the ZeRO-3 parameter partitions (`ds_tensor`), the optimizer's fp32 partitions and
gradient buffers, and the Adam moments (walking the optimizer's attributes and state),
with stage3_param_persistence_threshold 0 (nothing kept whole). Goal: per rank <= 1/N of
the 1-process figure + 10%.

Part B (activation checkpointing): one process, the same family at a larger sequence,
forward + backward with `activation_checkpointing` none vs full. Peak activation memory
is the peak of the running sum of allocator events reported by torch.profiler
(profile_memory=True) above the level at the start of the step, with gradient buffers
pre-allocated (so they do not count); step time is taken over 15 steps after a warm-up,
the two modes alternating, with 1 intra-op thread (time per core) and with 2; the ratio is the
median of the 15 per-round ratios (each pair ran back to back). The model's last block is
never recomputed (parallel/checkpointing.py), so "full" recomputes 11 of its 12 blocks. Goal: >= 3x
less activation memory for <= 35% more step time. Full recompute adds one forward per
block: on a GPU, where backward costs ~2x forward, that is ~1.33x; on this CPU backward
costs only ~1.7-1.9x forward, and with 2 threads the many small ops of the forward scale
worse than the GEMMs, so the ratio depends on the thread count.

Part B again, process-isolated (`--isolated PAIRS`, default 6): each mode alone in a fresh
process, as in training (one model per process, its allocator in steady state), none and
full processes alternating. In-process interleaving lets one model's allocations shape the
other's heap: with four models interleaved the `none` step ran 10-15% slower than alone.

Part C (`--zero-time PAIRS`, default 3): the step time of part B's model and batch (2 samples
per rank) trained by the DeepSpeed ZeRO-3 engine under torchrun with 1 and 2 processes
(`--zero-time-worlds 1,2,4` on a host with the cores for it), one
intra-op thread each (torchrun's default; on this 2-core machine, one core per rank), checkpointing
none vs full: the whole training step (forward, backward, ZeRO-3 gathers and reduce-scatters, AdamW
on the partitions), median of 8 steps after 3 warm-up steps, none and full runs alternating.
Under ZeRO-3 the backward gathers each block's parameters again in both modes (released after
the forward); with checkpointing the recompute's gather serves the block's backward too, so the
collectives are the same (counted once: 120 all-gathers per step either way, 2 processes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_BUILD_OPS", "0")


def flux(hidden_heads=8, head_dim=32, layers=4, single=8):
    from iomm_scale.models.flux_mmdit import FluxConfig, FluxMMDiT

    return FluxMMDiT(FluxConfig(in_channels=64, num_layers=layers, num_single_layers=single, num_heads=hidden_heads,
                                head_dim=head_dim, context_dim=256, pooled_dim=256, axes_dims_rope=(8, 12, 12),
                                attention_backend="sdpa"))


def batch(n, res, ctx=64, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, res, res, generator=g)
    z = torch.randn(n, 16, res, res, generator=g)
    t = torch.rand(n, generator=g)
    tt = t.view(-1, 1, 1, 1)
    return {"x_t": (1 - tt) * x + tt * z, "t": t, "cond": torch.randn(n, ctx, 256, generator=g),
            "cond_mask": torch.ones(n, ctx, dtype=torch.bool), "target": z - x}


# --------------------------------------------------------------------------- part A
def _storages(obj, seen: dict, depth=0):
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.numel() and obj.device.type != "meta":
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return
    if depth > 3:
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _storages(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, seen, depth + 1)


def zero_worker(out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from iomm_scale.parallel.config import ParallelConfig
    from iomm_scale.parallel.groups import init_distributed, init_parallel_state
    from iomm_scale.parallel.runtime import ParallelRuntime

    init_distributed()
    torch.set_num_threads(1)
    lay = init_parallel_state(ParallelConfig(zero_stage=3))
    torch.manual_seed(0)
    model = flux()
    n_params = sum(p.numel() for p in model.parameters())
    rt = ParallelRuntime.build(model, ParallelConfig(zero_stage=3),
                               lambda ps: torch.optim.AdamW(ps, lr=1e-4, betas=(0.9, 0.95)),
                               micro_batch=1, persistence_threshold=0)
    rt.train_step(batch(1, 16, 16, seed=lay.dp_rank))
    seen: dict = {}
    for p in rt.module.parameters():
        _storages(getattr(p, "ds_tensor", p.data), seen)
        if p.grad is not None:
            _storages(p.grad, seen)
    opt = rt.engine.optimizer
    for name, v in vars(opt).items():
        if name in ("optimizer",):
            continue
        _storages(v, seen)
    inner = getattr(opt, "optimizer", opt)
    _storages([s for s in inner.state.values()], seen)
    total = sum(seen.values())
    t = torch.tensor([float(total)])
    allv = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(allv, t)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"world": dist.get_world_size(), "params": n_params, "bytes_per_rank": [float(x) for x in allv]}, f)
    dist.barrier()
    dist.destroy_process_group()


def zero_time_worker(mode: str, steps: int, out_path: str) -> None:
    """Part C: median ZeRO-3 training-step time (rank 0's clock, ranks in step by a barrier)."""
    import torch
    import torch.distributed as dist

    from iomm_scale.parallel.config import ParallelConfig
    from iomm_scale.parallel.groups import init_distributed, init_parallel_state
    from iomm_scale.parallel.runtime import ParallelRuntime

    init_distributed()
    torch.set_num_threads(1)
    pcfg = ParallelConfig(zero_stage=3, activation_checkpointing=mode)
    lay = init_parallel_state(pcfg)
    torch.manual_seed(0)
    rt = ParallelRuntime.build(flux(layers=4, single=8), pcfg,
                               lambda ps: torch.optim.AdamW(ps, lr=1e-4, betas=(0.9, 0.95)), micro_batch=2)
    b = batch(2, 32, 64, seed=lay.dp_rank)  # part B's batch on every rank
    times = []
    for _ in range(steps + 3):
        dist.barrier()
        t0 = time.perf_counter()
        rt.train_step(b)
        times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"world": dist.get_world_size(), "mode": mode, "step_s": statistics.median(times[3:]),
                       "checkpointing": rt.info["checkpointing"]}, f, default=str)
    dist.barrier()
    dist.destroy_process_group()


def _torchrun(n: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
           str(29700 + n), os.path.abspath(__file__), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-4000:])


def part_c(pairs: int, worlds=(1, 2), steps: int = 8) -> dict:
    """ZeRO-3 step time, checkpointing none vs full, with `worlds` processes: `pairs` alternating
    none / full launches per world size; the ratio is the median of the per-pair ratios."""
    import tempfile

    def time_one(n: int, mode: str) -> float:
        path = os.path.join(tempfile.mkdtemp(), "time.json")
        _torchrun(n, ["--zero-time-worker", mode, str(steps), path])
        return json.load(open(path))["step_s"]

    return _alternating_pairs(worlds, pairs, time_one)


def part_a() -> list[dict]:
    import tempfile

    rows = []
    for n in (1, 2, 4):
        out = os.path.join(tempfile.mkdtemp(), "zero.json")
        _torchrun(n, ["--zero-worker", out])
        rows.append(json.load(open(out)))
    return rows


# --------------------------------------------------------------------------- part B
def _step(model, b):
    import torch.nn.functional as F

    loss = F.mse_loss(model(b["x_t"], b["t"], b["cond"], b["cond_mask"]), b["target"])
    loss.backward()


def peak_activation_bytes(model, b) -> int:
    from torch.profiler import ProfilerActivity, profile

    _step(model, b)  # allocate .grad buffers; later backwards accumulate in place
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, b)
    # Allocator timeline at op granularity: each op's own (self) allocations minus frees,
    # plus the "[memory]" events (frees outside any op), in start-time order.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, level)
    return int(peak)


def part_b(rounds: int = 15) -> dict:
    """Peak activation memory and fwd+bwd time, checkpointing none vs full, with 1 and 2
    intra-op threads. Times: the two models alternate step by step (so a change in machine
    load hits both alike), `rounds` after a warm-up step; reported as the median step time
    of each mode and as the median of the per-round ratios full / none (each round's pair
    ran back to back, so this is the figure least moved by the load of a shared machine)."""
    import copy

    import torch

    from iomm_scale.parallel.checkpointing import apply_activation_checkpointing, select_blocks

    torch.manual_seed(0)
    model = flux(layers=4, single=8)
    b = batch(2, 32, 64)  # 16x16 = 256 image tokens + 64 condition tokens
    models = {}
    for mode in ("none", "full"):
        models[mode] = m = copy.deepcopy(model)
        apply_activation_checkpointing(m, mode)
    out = {mode: {"peak_activation_bytes": peak_activation_bytes(m, b)} for mode, m in models.items()}
    n = len(model.blocks())
    out["checkpointed_blocks"] = f"{len(select_blocks(n, 'full'))} of {n}"
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = {mode: [] for mode in models}
        for _ in range(rounds + 1):
            for mode, m in models.items():
                t0 = time.perf_counter()
                _step(m, b)
                times[mode].append(time.perf_counter() - t0)
        for mode in models:
            out[mode][f"step_s_{threads}t"] = statistics.median(times[mode][1:])
        out[f"paired_ratio_{threads}t"] = statistics.median(f / n for f, n in zip(times["full"][1:], times["none"][1:]))
    return out


def time_worker(mode: str, threads: int, steps: int) -> float:
    """Median fwd+bwd step time of one model, alone in this process (after 3 warm-up steps)."""
    import torch

    from iomm_scale.parallel.checkpointing import apply_activation_checkpointing

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = flux(layers=4, single=8)
    apply_activation_checkpointing(model, mode)
    b = batch(2, 32, 64)
    times = []
    for _ in range(steps + 3):
        t0 = time.perf_counter()
        _step(model, b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


def part_b_isolated(pairs: int, steps: int = 11) -> dict:
    """Each mode alone in a fresh process (as in training: one model per process, its
    allocator in steady state), none and full processes alternating, `pairs` pairs per thread
    count; the ratio is the median of the per-pair ratios."""
    def time_one(threads: int, mode: str) -> float:
        res = subprocess.run([sys.executable, __file__, "--time-worker", mode, str(threads), str(steps)],
                             check=True, capture_output=True, text=True)
        return float(res.stdout.strip().splitlines()[-1])

    return _alternating_pairs((1, 2), pairs, time_one)


def _alternating_pairs(keys, pairs: int, time_one) -> dict:
    """{key: {"pairs": [{"none": s, "full": s}, ...], "ratio": median of full / none}}: for each
    key `pairs` pairs of fresh runs, none then full, so machine drift hits both alike."""
    out = {}
    for key in keys:
        rows = []
        for i in range(pairs):
            rows.append({mode: time_one(key, mode) for mode in ("none", "full")})
            # progress as it comes: a run stopped by a time limit still leaves its finished pairs
            print(f"[{key}] pair {i + 1}/{pairs}: none {rows[-1]['none']:.3f} s, full {rows[-1]['full']:.3f} s, "
                  f"ratio {rows[-1]['full'] / rows[-1]['none']:.3f}", flush=True)
        out[key] = {"pairs": rows, "ratio": statistics.median(p["full"] / p["none"] for p in rows)}
    return out


def _pairs_table(title: str, column: str, results: dict, label) -> list[str]:
    """Markdown lines for {threads or processes: {"pairs": [{"none", "full"}], "ratio"}}."""
    lines = ["", title, "", f"| {column} | none s (per pair) | full s (per pair) | full / none, median of pairs (range) |",
             "|---|---|---|---|"]
    for key, r in results.items():
        ratios = [p["full"] / p["none"] for p in r["pairs"]]
        none_s = " ".join(f"{p['none']:.3f}" for p in r["pairs"])
        full_s = " ".join(f"{p['full']:.3f}" for p in r["pairs"])
        lines.append(f"| {key} | {none_s} | {full_s} | {r['ratio']:.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")
    return lines + ["", "; ".join(f"{label(key)} = {r['ratio']:.3f} (goal <= 1.35: "
                                  f"{'met' if r['ratio'] <= 1.35 else 'MISSED'})" for key, r in results.items())]


def _csv(text: str, conv=str) -> list:
    return [conv(x) for x in text.split(",") if x.strip()]


def part_a_lines(a: list[dict]) -> list[str]:
    base = max(a[0]["bytes_per_rank"])
    lines = ["| processes | params | max bytes / rank (params+grads+optimizer) | vs 1-process | goal <= |",
             "|---|---|---|---|---|"]
    ok_a = True
    for row in a:
        n, worst = row["world"], max(row["bytes_per_rank"])
        goal = base / n * 1.10
        ok_a &= worst <= goal
        lines.append(f"| {n} | {row['params']:,} | {worst / 2**20:.1f} MiB | {worst / base:.3f} | {goal / base:.3f} |")
    return lines + ["", f"ZeRO-3 per-rank goal {'met' if ok_a else 'MISSED'}"]


def part_b_lines(b: dict) -> list[str]:
    none, full = b["none"], b["full"]
    mem_ratio = none["peak_activation_bytes"] / max(full["peak_activation_bytes"], 1)
    ratios = {t: b[f"paired_ratio_{t}t"] for t in (1, 2)}
    lines = ["", f"| activation checkpointing ({b['checkpointed_blocks']} blocks recomputed under full) | "
             "peak activation memory | fwd+bwd, 1 thread | fwd+bwd, 2 threads |", "|---|---|---|---|"]
    for mode, r in (("none", none), ("full", full)):
        lines.append(f"| {mode} | {r['peak_activation_bytes'] / 2**20:.1f} MiB | {r['step_s_1t']:.3f} s | "
                     f"{r['step_s_2t']:.3f} s |")
    lines.append("| full / none | " + f"{1 / mem_ratio:.3f} | "
                 + " | ".join(f"{full[f'step_s_{t}t'] / none[f'step_s_{t}t']:.3f} (medians), {ratios[t]:.3f} (paired)"
                              for t in (1, 2)) + " |")
    return lines + ["", f"memory ratio none/full = {mem_ratio:.2f}x (goal >= 3x: {'met' if mem_ratio >= 3 else 'MISSED'}); "
                    + "; ".join(f"time ratio full/none (median of paired rounds), {t} thread{'s' if t > 1 else ''} = "
                                f"{r:.3f} (goal <= 1.35: {'met' if r <= 1.35 else 'MISSED'})" for t, r in ratios.items())]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero-worker")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--part-a-json", help="reuse part A rows written by an earlier run (--save-part-a)")
    ap.add_argument("--save-part-a", help="write part A rows to this JSON file")
    ap.add_argument("--rounds", type=int, default=15, help="timed steps per mode and thread count (part B)")
    ap.add_argument("--isolated", type=int, default=6, metavar="PAIRS",
                    help="part B again with each mode alone in its own process: PAIRS none/full process pairs per "
                         "thread count (0: skip)")
    ap.add_argument("--zero-time", type=int, default=3, metavar="PAIRS",
                    help="part C: ZeRO-3 step time with 1 and 2 processes, PAIRS none/full launch pairs each (0: skip)")
    ap.add_argument("--zero-time-worlds", default="1,2",
                    help="part C's world sizes (default 1,2: this 2-core VM; 1,2,4 on a larger host)")
    ap.add_argument("--zero-time-steps", type=int, default=8, help="part C's timed steps per launch (after 3)")
    ap.add_argument("--parts", default="a,b,isolated,c", help="which parts to run (comma list of a,b,isolated,c)")
    ap.add_argument("--zero-time-worker", nargs=3, metavar=("MODE", "STEPS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--time-worker", nargs=3, metavar=("MODE", "THREADS", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_worker:
        mode, threads, steps = args.time_worker
        print(f"{time_worker(mode, int(threads), int(steps)):.6f}")
        return
    if args.zero_worker or args.zero_time_worker:
        import warnings

        warnings.filterwarnings("ignore")
        if args.zero_worker:
            zero_worker(args.zero_worker)
        else:
            mode, steps, out = args.zero_time_worker
            zero_time_worker(mode, int(steps), out)
        return
    parts = set(_csv(args.parts))
    if parts - {"a", "b", "isolated", "c"}:
        ap.error(f"--parts takes a, b, isolated, c; got {args.parts!r}")
    lines: list[str] = []
    if "a" in parts:
        a = json.load(open(args.part_a_json)) if args.part_a_json else part_a()
        if args.save_part_a:
            json.dump(a, open(args.save_part_a, "w"))
        lines += part_a_lines(a)
    if "b" in parts:
        lines += part_b_lines(part_b(args.rounds))
    iso = part_b_isolated(args.isolated) if args.isolated and "isolated" in parts else None
    if iso:
        lines += _pairs_table(f"Process-isolated (each mode alone in a fresh process, {args.isolated} alternating "
                              "none/full process pairs per thread count, median of 11 steps each):", "threads", iso,
                              lambda t: f"process-isolated time ratio full/none, {t} thread{'s' if t > 1 else ''}")
    worlds = tuple(_csv(args.zero_time_worlds, int))
    zt = part_c(args.zero_time, worlds, args.zero_time_steps) if args.zero_time and "c" in parts else None
    if zt:
        lines += _pairs_table(f"ZeRO-3 training step (part C: torchrun, 1 thread per rank, {args.zero_time} alternating "
                              f"none/full launch pairs per world size, median of {args.zero_time_steps} steps each):", "processes", zt,
                              lambda n: f"ZeRO-3 step time ratio full/none, {n} process{'es' if n > 1 else ''}")
    table = "\n".join(lines)
    print(table)
    if args.record:
        machine = f"{platform.node()} ({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}), torch " \
                  f"{__import__('torch').__version__}, deepspeed {__import__('deepspeed').__version__}, gloo"
        text = (f"\n### ZeRO-3 memory per rank and activation checkpointing ({datetime.date.today().isoformat()})\n\n"
                f"Machine: {machine}. Command: `python benchmarks/bench_zero_memory.py {' '.join(sys.argv[1:])}` "
                f"(parts {args.parts}).\n"
                "Part A: FluxMMDiT (hidden 256, 4 double + 8 single blocks), one AdamW step under a DeepSpeed ZeRO-3 "
                "engine (fp32, persistence threshold 0), bytes of every storage the engine holds for params, "
                "grads and optimizer state. Part B: one process, batch 2, 256 image + 64 condition tokens, "
                "forward+backward; peak = running sum of torch.profiler CPU allocator events, grads preallocated; "
                f"time = {args.rounds} steps per mode, none and full alternating, with 1 and 2 intra-op threads, then "
                f"{args.isolated} process-isolated pairs per thread count. Part C: part B's model and per-rank batch "
                f"under a ZeRO-3 engine with {args.zero_time_worlds} processes (torchrun, 1 thread per rank), whole "
                "training step, "
                f"{args.zero_time} none/full launch pairs each (load average "
                f"{os.getloadavg()[0]:.1f} at the end).\n\n" + table + "\n")
        path = os.path.join(ROOT, "benchmarks", "RESULTS.md")
        existing = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
        header = "## Scale-out (issue 5)"
        if header not in existing:
            existing = existing.rstrip("\n") + f"\n\n{header}\n"
        start = existing.index(header) + len(header)
        nxt = existing.find("\n## ", start)  # keep our entries inside our section
        cut = len(existing) if nxt < 0 else nxt
        with open(path, "w") as f:
            f.write(existing[:cut].rstrip("\n") + "\n" + text + existing[cut:])


if __name__ == "__main__":
    main()
