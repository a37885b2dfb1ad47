"""Muon optimizer cost (issue 6), CPU.

1. Optimizer step time as a fraction of forward + backward, for an IOMM-B-shaped FLUX MM-DiT
   reduced to run on 2 CPU cores: IOMM-B's proportions (configs/b.yaml: head_dim 128,
   double : single blocks ~ 1 : 2, mlp ratio 4, 512 px -> 1024 image tokens + 256 condition
   tokens) at hidden 256 (2 heads x 128), 1 double + 2 single blocks, batch 1, fp32, one thread
   (--threads) and both wall and CPU seconds, because the machine is shared.
   Muon+AdamW (Newton-Schulz fp32, what "auto" picks on CPU) and plain torch.optim.AdamW;
   repeats interleaved (fwd+bwd, Muon step, AdamW step, ...) so machine load hits all alike;
   medians. bf16 Newton-Schulz is timed on the largest matrix only (no native bf16 on this CPU).
2. Newton-Schulz time per rank with 1, 2 and 4 owning ranks: every Muon matrix timed alone,
   then partitioned exactly as DistributedMuon does (`balanced_owners` on the FLOP estimate);
   the busiest rank's time is the critical path. The FLOP model's own prediction is printed
   beside it.
3. --torchrun: DistributedMuon.step() per rank with 1, 2 and 4 gloo processes (gradients
   pre-set, so the step is all that runs; includes the all-gather). 4 processes oversubscribe
   2 cores.
4. Analytic: Newton-Schulz FLOPs / (forward + backward FLOPs) per optimizer step, for the
   benchmarked model (checks the FLOP model against 1.) and for the real IOMM-B (hidden 1536,
   10 + 21 blocks, micro-batch 32 x accumulation 4, 8 data-parallel owner ranks).

    python benchmarks/bench_muon.py [--repeats 3] [--torchrun] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from iomm_scale.models.flux_mmdit import FluxConfig, FluxMMDiT
from iomm_scale.optim.muon import MuonWithAdamW, build_muon_param_groups, orthogonalize
from iomm_scale.optim.muon_dist import balanced_owners, ns_cost

SMALL = FluxConfig(num_layers=1, num_single_layers=2, num_heads=2, head_dim=128, context_dim=256, pooled_dim=256,
                   axes_dims_rope=(16, 56, 56), in_channels=64, attention_backend="sdpa")
IOMM_B = FluxConfig(num_layers=10, num_single_layers=21, num_heads=12, head_dim=128, context_dim=1536,
                    pooled_dim=1536, axes_dims_rope=(16, 56, 56), in_channels=64)
BATCH, LATENT, N_TXT = 1, 64, 256  # 64 x 64 latents (512 px) -> 32 x 32 = 1024 image tokens
MUON = dict(lr=1e-4, adjust_lr_fn="match_rms_adamw", ns_dtype="float32")


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall seconds and median CPU seconds (all threads of this process) of each
    callable; one warm-up, then the callables in turn, `repeats` rounds. On a shared machine
    the CPU time is the steadier measure of work; the wall time is what a step costs."""
    for fn in fns.values():
        fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def make_inputs(cfg, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, LATENT, LATENT, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, N_TXT, cfg.context_dim, generator=g), torch.randn(batch, 16, LATENT, LATENT, generator=g))


def measure(repeats):
    """1. and 2. in one interleaved loop, so every figure sees the same machine load."""
    torch.manual_seed(0)
    model = FluxMMDiT(SMALL)
    x, t, cond, target = make_inputs(SMALL, BATCH)

    def fwd_bwd():
        model.zero_grad(set_to_none=False)
        F.mse_loss(model(x, t, cond), target).backward()

    fwd_bwd()  # gradients exist from here on; the optimizer steps only read them
    groups = build_muon_param_groups(model, modulation="muon")
    muon_group = groups[0]
    muon = MuonWithAdamW(groups, **MUON)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ns_group = dict(ns_coefficients="keller", ns_steps=5, ns_norm_scale=None, ns_dtype="float32", eps=1e-7,
                    adjust_lr_fn="match_rms_adamw")
    updates = [torch.randn_like(p) for p in muon_group["params"]]
    fns = {"fwd_bwd_s": fwd_bwd, "muon_step_s": muon.step, "adamw_step_s": adamw.step}
    for i, (u, lay) in enumerate(zip(updates, muon_group["layouts"])):
        fns[i] = lambda u=u, lay=lay: orthogonalize(u, lay, ns_group)
    med, cpu = interleaved(fns, repeats)
    out = {k: med[k] for k in ("fwd_bwd_s", "muon_step_s", "adamw_step_s")}
    out["cpu"] = {k: cpu[k] for k in ("fwd_bwd_s", "muon_step_s", "adamw_step_s")}
    out["params"] = sum(p.numel() for p in model.parameters())
    out["muon_tensors"], out["muon_params"] = len(updates), sum(p.numel() for p in muon_group["params"])

    # 2. Newton-Schulz per owning rank.
    times = [cpu[i] for i in range(len(updates))]  # CPU seconds: work per rank, robust to load
    costs = [ns_cost(tuple(p.shape), lay) for p, lay in zip(muon_group["params"], muon_group["layouts"])]
    out["ns_total_s"] = sum(times)
    out["ns"] = {}
    for world in (1, 2, 4):
        owners = balanced_owners(costs, world)
        per_rank = [sum(t for t, o in zip(times, owners) if o == r) for r in range(world)]
        per_cost = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        out["ns"][world] = {"per_rank_s": per_rank, "critical_s": max(per_rank), "speedup": sum(times) / max(per_rank),
                            "flop_speedup": sum(costs) / max(per_cost)}

    # bf16 vs fp32 Newton-Schulz on the largest matrix (no native bf16 matmul on this CPU).
    i = max(range(len(updates)), key=lambda i: updates[i].numel())
    for dtype in ("float32", "bfloat16"):
        g = dict(ns_group, ns_dtype=dtype)
        out[f"ns_{dtype}_largest_s"] = timed(lambda: orthogonalize(updates[i], muon_group["layouts"][i], g))
    out["largest"] = f"{muon_group['param_names'][i]} {list(updates[i].shape)}"
    return out


# --- --torchrun: DistributedMuon.step() per rank -------------------------------------------------
def dist_worker(out_path, repeats):
    import torch.distributed as dist

    from iomm_scale.optim.muon_dist import DistributedMuon

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = FluxMMDiT(SMALL)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = DistributedMuon(build_muon_param_groups(model, modulation="muon"), dp_group=dist.group.WORLD,
                          lr=1e-4, adjust_lr_fn="match_rms_adamw", ns_dtype="float32")

    def step():
        dist.barrier()
        opt.step()

    wall, cpu = interleaved({"step": step}, repeats)
    t = {"wall": wall["step"], "cpu": cpu["step"]}
    res = [None] * world
    dist.all_gather_object(res, t)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def torchrun_steps(repeats):
    out = {}
    for n in (1, 2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "r.json")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                            __file__, "--dist-worker", path, "--repeats", str(repeats)], check=True,
                           capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            with open(path) as f:
                out[n] = json.load(f)
    return out


def analytic(cfg, micro, accum=1, dp=1):
    """Newton-Schulz FLOPs (`ns_cost`) over forward+backward FLOPs per optimizer step.
    forward = 2 x matmul params x tokens + 4 x tokens^2 x hidden per block (QK^T and AV);
    forward + backward = 3 x forward."""
    with torch.device("meta"):
        model = FluxMMDiT(cfg)
    muon = build_muon_param_groups(model, modulation="muon")[0]
    ns = sum(ns_cost(tuple(p.shape), lay) for p, lay in zip(muon["params"], muon["layouts"]))
    tokens = 1024 + N_TXT
    blocks = cfg.num_layers + cfg.num_single_layers
    matmul_params = sum(p.numel() for p in model.parameters() if p.ndim == 2)
    fwd = 2 * matmul_params * tokens + blocks * 4 * tokens ** 2 * cfg.hidden_size
    fb = 3 * fwd * micro * accum
    return {"ns_flops": ns, "fwd_bwd_flops": fb, "ratio_one_owner": ns / fb, "ratio_dp_owners": ns / dp / fb,
            "muon_params": sum(p.numel() for p in muon["params"]), "micro": micro, "accum": accum, "dp": dp}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torchrun", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads; 1 (default) keeps CPU seconds a clean measure of work on a shared "
                         "machine (idle OpenMP threads spin and bill CPU time)")
    ap.add_argument("--dist-worker", default=None)
    args = ap.parse_args()
    if args.dist_worker:
        return dist_worker(args.dist_worker, args.repeats)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()[0], "step": measure(args.repeats), "small": analytic(SMALL, BATCH),
           "iomm_b": analytic(IOMM_B, micro=32, accum=4, dp=8)}
    if args.torchrun:
        res["torchrun_step_s"] = torchrun_steps(args.repeats)
    res["load_after"], res["wall_s"] = os.getloadavg()[0], time.perf_counter() - t0
    if not args.markdown:
        print(json.dumps(res, indent=1))
        return
    s = res["step"]
    print(f"Model: FLUX MM-DiT hidden 256 (2 x 128), 1 double + 2 single blocks, {s['params']:,} params "
          f"({s['muon_tensors']} Muon matrices, {s['muon_params']:,} params), batch {BATCH}, 1024 + {N_TXT} tokens, "
          f"fp32, {res['threads']} threads; load average {res['load_before']:.1f} -> {res['load_after']:.1f}; "
          f"benchmark wall {res['wall_s']:.0f} s\n")
    c = s["cpu"]
    print("| | wall median (s) | / fwd+bwd | CPU median (s) | / fwd+bwd |\n|---|---|---|---|---|")
    for k, label in (("fwd_bwd_s", "forward + backward"), ("muon_step_s", "Muon+AdamW step (NS fp32)"),
                     ("adamw_step_s", "torch.optim.AdamW step")):
        print(f"| {label} | {s[k]:.4f} | {s[k] / s['fwd_bwd_s']:.3f} | {c[k]:.4f} | {c[k] / c['fwd_bwd_s']:.3f} |")
    print(f"\nFLOP model for this run: NS / fwd+bwd = {res['small']['ratio_one_owner']:.3f}. "
          f"Newton-Schulz on the largest matrix ({s['largest']}): fp32 {s['ns_float32_largest_s']:.3f} s, "
          f"bf16 {s['ns_bfloat16_largest_s']:.3f} s ({s['ns_bfloat16_largest_s'] / s['ns_float32_largest_s']:.1f}x).")
    print(f"\nNewton-Schulz per rank (fp32, CPU seconds, in-process, matrices partitioned as DistributedMuon "
          f"does; all {s['muon_tensors']} matrices: {s['ns_total_s']:.3f} s):\n")
    print("| owning ranks | per-rank NS (s) | critical path (s) | speed-up measured | speed-up by FLOPs |")
    print("|---|---|---|---|---|")
    for world, r in s["ns"].items():
        per = ", ".join(f"{x:.3f}" for x in r["per_rank_s"])
        print(f"| {world} | {per} | {r['critical_s']:.3f} | {r['speedup']:.2f}x | {r['flop_speedup']:.2f}x |")
    if "torchrun_step_s" in res:
        print("\nDistributedMuon.step() per rank, real gloo processes, 1 thread each (NS fp32, incl. the "
              "all-gather):\n")
        print("| processes | per-rank wall (s) | per-rank CPU (s) |\n|---|---|---|")
        for n, ts in res["torchrun_step_s"].items():
            wall = ", ".join(f"{x['wall']:.3f}" for x in ts)
            cpu = ", ".join(f"{x['cpu']:.3f}" for x in ts)
            print(f"| {n} | {wall} | {cpu} |")
    b = res["iomm_b"]
    print(f"\nIOMM-B analytic (hidden 1536, 10 + 21 blocks, {b['muon_params'] / 1e9:.2f}B Muon params, micro-batch "
          f"{b['micro']} x accumulation {b['accum']}): NS FLOPs / fwd+bwd FLOPs per optimizer step = "
          f"{b['ratio_one_owner']:.4f} with one owner, {b['ratio_dp_owners']:.4f} over {b['dp']} owner ranks.")


if __name__ == "__main__":
    main()
