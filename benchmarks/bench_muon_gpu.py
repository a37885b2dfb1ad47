"""Muon's optimizer step against forward + backward at IOMM-XL shapes, on one GPU (issue 6).

    python benchmarks/bench_muon_gpu.py --out DIR                     # CUDA (gpu_check.sh, stage "muon")
    python benchmarks/bench_muon_gpu.py --device cpu --dry-run --out DIR   # toy sizes on CPU, a few s

What runs (configs/xl.yaml, as it trains, unless a flag says otherwise):
  * The IOMM-XL generator (Z-Image S3-DiT: hidden 3840 = 30 x 128 heads, SwiGLU 10240) with
    --layers main blocks (default 8) and no refiner blocks, fp32 master weights, bf16 autocast,
    micro-batch data.batch_size (16) at data.resolution (512 px -> 64 x 64 latents -> 1024 image
    tokens) + the generator's condition length (256 RQA queries); attention as the config says.
    The whole 30 + 2 + 2-block generator (6.15 B params) does not fit one 80 GB GPU this way
    (fp32 weights + grads + Muon momentum alone ~74 GB, ~98 GB with AdamW's two moments); 8 blocks
    are 1.46 B params (~23 GB with AdamW state). Forward + backward and the optimizer step both
    grow linearly with the number of blocks, so their ratio does not depend on --layers (the
    embedders and final layer, 7.9 M params = 0.5% at 8 blocks, are in both).
  * forward + backward (loss = MSE, grads set to None first, as the trainer's first micro-batch),
    per activation-checkpointing mode (--checkpointing, default "full" as trained, then "none").
  * MuonWithAdamW.step() built by `build_muon_optimizer` from the config: the training routing
    (AdaLN modulation to Muon, fused q|k|v and w1|w3 per segment), Newton-Schulz 5 steps in
    bf16 ("auto" on GPU), match_rms_adamw scaling; then torch.optim.AdamW(fused=True) on all
    parameters for reference. Grads stay from the last backward; each optimizer is deleted
    before the next is built, so each step runs next to its own state only, as in training.
  * Newton-Schulz per owner rank: every distinct Muon matrix of the *full* IOMM-XL generator
    (34 blocks) timed alone, then the matrices assigned to 1, 2, 4, 8 and --dp owners exactly as
    DistributedMuon does (`balanced_owners` on `ns_cost`); the busiest rank's summed time is the
    critical path, and that rank's matrices are also run back to back ("direct") as a check.
    Estimated against the full generator's forward + backward (measured per-layer figure scaled
    by the FLOP formula `generator_flops`) x train.grad_accum micro-batches per optimizer step.
Timing: CUDA events around each call after warm-up, median (perf_counter on CPU).

Goal (issue 6): optimizer step <= 3% of forward + backward per optimizer step, i.e. over the
train.grad_accum (8) micro-batches it follows. The tables give the per-micro-batch ratio too.
Outputs in --out: muon.md (the tables), muon_steps.csv, muon_ns_owners.csv, muon.json; they are
rewritten after every phase, so a run cut off by a time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from iomm_scale.config import load_config  # noqa: E402
from iomm_scale.models.s3dit import S3DiT  # noqa: E402
from iomm_scale.optim.muon import build_muon_optimizer, orthogonalize, ns_dtype_for  # noqa: E402
from iomm_scale.optim.muon_dist import balanced_owners, ns_cost  # noqa: E402
from iomm_scale.parallel.checkpointing import apply_activation_checkpointing  # noqa: E402
from iomm_scale.profiling.flops import condition_lengths, generator_flops, latent_hw  # noqa: E402

GOAL = 0.03  # optimizer step / forward+backward per optimizer step (Moonlight reports 1-3%)
XL = os.path.join(ROOT, "configs", "xl.yaml")
# --dry-run: the same code at toy sizes (hidden 64 = 2 x 32, 64 image + 16 condition tokens)
DRY_OVERRIDES = ["model.generator.num_heads=2", "model.generator.head_dim=32", "model.generator.axes_dims=[8,12,12]",
                 "model.generator.context_dim=64", "model.generator.num_layers=6",
                 "model.generator.num_refiner_layers=1", "model.conditioner.rqa.num_queries=16", "data.resolution=128",
                 "data.batch_size=2"]


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def time_ms(label: str, fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of `fn()` after `warmup` calls: CUDA events on a GPU, perf_counter
    on CPU. `label` names the measurement (the tests substitute known times by label)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def free(device: torch.device) -> None:
    if device.type == "cuda":  # hand deleted optimizer states back before the next phase
        gc.collect()
        torch.cuda.empty_cache()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------
# the measurements
# ----------------------------------------------------------------------------------------------
def setup(args) -> tuple:
    """-> (full run config, bench run config with --layers main blocks and no refiners)."""
    over = DRY_OVERRIDES if args.dry_run else []
    full = load_config(args.config, over)
    layers = args.layers or (2 if args.dry_run else 8)
    bench = load_config(args.config, over + [f"model.generator.num_layers={layers}",
                                             "model.generator.num_refiner_layers=0"])
    return full, bench


def key_of(p: torch.Tensor, layout: dict | None) -> tuple:
    """Newton-Schulz time depends on the shape and the block layout only: one timing per key."""
    return tuple(p.shape), json.dumps(layout, sort_keys=True)


def run_fwd_bwd(gen, mode: str, inputs: tuple, dev: torch.device, warm: int, iters: int, res: dict) -> None:
    """forward + backward of `gen` with `mode` activation checkpointing (grads set to None first,
    as the trainer's first micro-batch after optimizer.zero_grad(set_to_none=True))."""
    x, t, cond, target = inputs
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def fwd_bwd():
        gen.zero_grad(set_to_none=True)
        with autocast:
            out = gen(x, t, cond)
        F.mse_loss(out.float(), target).backward()

    apply_activation_checkpointing(gen, mode)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        res["fwd_bwd_ms"][mode] = time_ms(f"fwd_bwd:{mode}", fwd_bwd, dev, warm, iters)
        res["status"][mode] = "ok"
    except torch.OutOfMemoryError as e:
        res["status"][mode] = f"OOM: {str(e).splitlines()[0][:120]}"
        gen.zero_grad(set_to_none=True)
    res["peak_gib"][f"fwd_bwd:{mode}"] = peak_gib(dev)
    free(dev)
    print(f"forward+backward, checkpointing {mode}: {_ms(res['fwd_bwd_ms'].get(mode))} ms ({res['status'][mode]})",
          flush=True)


def time_optimizer(label: str, opt, dev: torch.device, warm: int, iters: int, res: dict) -> float:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = time_ms(label, opt.step, dev, warm, iters)
    res["peak_gib"][label] = peak_gib(dev)
    print(f"{label}: {ms:.3f} ms", flush=True)
    return ms


def measure(args, res: dict, save) -> None:
    dev = torch.device(args.device)
    full_cfg, cfg = setup(args)
    g = cfg.generator
    b = args.micro_batch or cfg.data.batch_size
    h, w = latent_hw(cfg)
    cond_len = condition_lengths(cfg)["generator"]
    warm, iters = (1, 2) if args.dry_run else (args.warmup, args.iters)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)" if args.dry_run else "cpu"
    res.update(device=name,
               torch=torch.__version__, config=os.path.relpath(args.config, ROOT), layers=g.num_layers,
               full_blocks=full_cfg.generator.num_layers + 2 * full_cfg.generator.num_refiner_layers,
               hidden=g.hidden_size, ffn=g.ffn_hidden_size, micro_batch=b, resolution=cfg.data.resolution,
               image_tokens=(h // g.patch_size) * (w // g.patch_size), cond_tokens=cond_len,
               attention=g.attention_backend, grad_accum=cfg.train.grad_accum, dp=args.dp, tp=cfg.parallel.tp,
               precision="fp32 weights, bf16 autocast" if dev.type == "cuda" else "fp32",
               warmup=warm, iters=iters, fwd_bwd_ms={}, status={}, peak_gib={})

    torch.manual_seed(0)
    with torch.device(dev):  # initialised where it runs
        gen = S3DiT(g).train()
    res["params"] = sum(p.numel() for p in gen.parameters())
    rng = torch.Generator().manual_seed(0)
    inputs = tuple(a.to(dev) for a in (torch.randn(b, g.latent_channels, h, w, generator=rng),  # latents
                                       torch.rand(b, generator=rng),  # t
                                       torch.randn(b, cond_len, g.context_dim, generator=rng),  # condition
                                       torch.randn(b, g.latent_channels, h, w, generator=rng)))  # target
    modes = args.checkpointing.split(",")
    run_fwd_bwd(gen, modes[0], inputs, dev, warm, iters, res)
    save(res)
    for p in gen.parameters():  # only when that backward ran out of memory: the optimizers need grads
        if p.grad is None:
            p.grad = torch.randn_like(p) * 1e-3

    # MuonWithAdamW exactly as training builds it; then torch's AdamW. One optimizer at a time.
    opt = build_muon_optimizer(gen, cfg)
    group = next(gr for gr in opt.param_groups if gr["use_muon"])
    res["routing"] = [line for line in opt.routing_table.splitlines() if line.startswith("[")]
    res["ns_dtype"] = str(ns_dtype_for(group["ns_dtype"], dev)).replace("torch.", "")
    res["adjust_lr_fn"], res["ns_steps"] = group["adjust_lr_fn"], group["ns_steps"]
    res["muon_matrices"] = len(group["params"])
    bench_keys = [key_of(p, lay) for p, lay in zip(group["params"], group["layouts"])]
    res["muon_ms"] = time_optimizer("muon_step", opt, dev, warm, iters, res)
    del opt, group
    free(dev)
    save(res)
    o = cfg.optim
    fused = dev.type == "cuda"
    adamw = torch.optim.AdamW(gen.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                              fused=fused)
    res["adamw"] = "torch.optim.AdamW(fused=True)" if fused else "torch.optim.AdamW (foreach)"
    res["adamw_ms"] = time_optimizer("adamw_step", adamw, dev, warm, iters, res)
    del adamw
    free(dev)
    save(res)

    # the full generator's forward+backward, from the per-layer measurement and the FLOP formula
    flops = lambda c: generator_flops("s3dit", c.generator, b, (h, w), cond_len, cond_grad=False).total  # noqa: E731
    res["full_over_bench_flops"] = flops(full_cfg) / flops(cfg)
    key_ms = ns_per_owner(args, full_cfg, dev, warm, iters, res)
    res["ns_bench_ms"] = sum(key_ms[k] for k in bench_keys)  # this run's matrices, each timed alone
    save(res)

    for mode in modes[1:]:  # the optimizer states are gone: room for the activations
        run_fwd_bwd(gen, mode, inputs, dev, warm, iters, res)
        save(res)


def ns_per_owner(args, full_cfg, dev: torch.device, warm: int, iters: int, res: dict) -> dict:
    """Newton-Schulz of every Muon matrix of the full generator, owned as DistributedMuon does."""
    with torch.device("meta"):
        full = S3DiT(full_cfg.generator)
    group = next(gr for gr in build_muon_optimizer(full, full_cfg).param_groups if gr["use_muon"])
    ns_keys = ("ns_coefficients", "ns_steps", "ns_norm_scale", "ns_dtype", "eps", "adjust_lr_fn")
    ns_group = {k: group[k] for k in ns_keys}
    keys = [key_of(p, lay) for p, lay in zip(group["params"], group["layouts"])]
    costs = [ns_cost(tuple(p.shape), lay, group["ns_steps"]) for p, lay in zip(group["params"], group["layouts"])]
    first = {}
    for name, k, c in zip(group["param_names"], keys, costs):
        first.setdefault(k, (name, c))
    updates, key_ms, res["ns_matrices"] = {}, {}, []
    for k, (name, cost) in first.items():
        shape, lay = k
        updates[k] = u = torch.randn(shape, device=dev)  # an fp32 momentum-shaped update
        key_ms[k] = time_ms(f"ns:{name}", lambda u=u, lay=json.loads(lay): orthogonalize(u, lay, ns_group),
                            dev, warm, iters)
        segs = json.loads(lay).get("segments") if lay != "null" else None
        res["ns_matrices"].append({"example": name, "shape": list(shape), "segments": segs, "count": keys.count(k),
                                   "ms": key_ms[k], "gflop": cost / 1e9})
        print(f"Newton-Schulz {name} {list(shape)} x{keys.count(k)}: {key_ms[k]:.3f} ms", flush=True)
    times = [key_ms[k] for k in keys]
    res["ns_full_matrices"], res["ns_full_ms"] = len(keys), sum(times)
    res["owners"] = []
    for world in sorted(set(args.owners) | {args.dp}):
        owners = balanced_owners(costs, world)  # DistributedMuon.owners on the same shapes
        per_rank = [sum(t for t, o in zip(times, owners) if o == r) for r in range(world)]
        busiest = max(range(world), key=per_rank.__getitem__)
        mine = [(updates[k], json.loads(k[1])) for k, o in zip(keys, owners) if o == busiest]
        direct = time_ms(f"ns_owner:{world}", lambda mine=mine: [orthogonalize(u, lay, ns_group) for u, lay in mine],
                         dev, 1, 1 if args.dry_run else 2)
        res["owners"].append({"owners": world, "per_rank_ms": per_rank, "critical_ms": max(per_rank),
                              "direct_ms": direct, "matrices_on_busiest": len(mine)})
        print(f"{world} owners: critical path {max(per_rank):.3f} ms (direct {direct:.3f} ms)", flush=True)
    return key_ms


# ----------------------------------------------------------------------------------------------
# tables: every ratio is computed here from the measured milliseconds in `res`
# ----------------------------------------------------------------------------------------------
def step_rows(res: dict) -> list[dict]:
    accum, rows = res["grad_accum"], []
    for mode, status in res.get("status", {}).items():
        fb, mu, ad = res["fwd_bwd_ms"].get(mode), res.get("muon_ms"), res.get("adamw_ms")
        row = {"checkpointing": mode, "fwd_bwd_ms": fb, "muon_step_ms": mu, "adamw_step_ms": ad, "status": status}
        if fb:
            if mu is not None:
                row.update(muon_ratio=mu / fb, muon_ratio_per_opt_step=mu / (accum * fb))
                row["goal_met"] = row["muon_ratio_per_opt_step"] <= GOAL
            if ad is not None:
                row.update(adamw_ratio=ad / fb)
        rows.append(row)
    return rows


def full_fwd_bwd_ms(res: dict) -> float | None:
    """The full generator's forward+backward (first checkpointing mode), scaled by FLOPs."""
    modes = [m for m in res.get("status", {}) if m in res["fwd_bwd_ms"]]
    if not modes or "full_over_bench_flops" not in res:
        return None
    return res["fwd_bwd_ms"][modes[0]] * res["full_over_bench_flops"]


def owner_rows(res: dict) -> list[dict]:
    fb_full, rows = full_fwd_bwd_ms(res), []
    one = next((o["critical_ms"] for o in res.get("owners", []) if o["owners"] == 1), None)
    for o in res.get("owners", []):
        row = {"owners": o["owners"], "per_rank_min_ms": min(o["per_rank_ms"]), "critical_ms": o["critical_ms"],
               "direct_ms": o["direct_ms"], "speedup": one / o["critical_ms"] if one else None}
        if fb_full:
            row["ratio_per_opt_step"] = o["critical_ms"] / (res["grad_accum"] * fb_full)
            row["goal_met"] = row["ratio_per_opt_step"] <= GOAL
        rows.append(row)
    return rows


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3g}" if x < 10 else f"{x:.1f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _goal(x) -> str:
    return "-" if x is None else "met" if x else "not met"


def step_header(res: dict) -> list[str]:
    return ["checkpointing", "ms fwd+bwd", "ms Muon step", "Muon / fwd+bwd", "ms AdamW step", "AdamW / fwd+bwd",
            f"Muon / ({res['grad_accum']} x fwd+bwd)", f"goal <= {GOAL:.0%}"]


def owner_header(res: dict) -> list[str]:
    return ["owners", "NS ms per rank (min .. max)", "critical path ms", "busiest rank direct ms", "speed-up",
            f"critical / ({res['grad_accum']} x fwd+bwd)", f"goal <= {GOAL:.0%}"]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(res: dict) -> str:
    r = res
    out = [f"IOMM-XL Muon step vs forward+backward on {r['device']} (torch {r['torch']}), {r['config']}: "
           f"S3-DiT hidden {r['hidden']} (SwiGLU {r['ffn']}), {r['layers']} of {r['full_blocks']} blocks "
           f"({r.get('params', 0) / 1e6:,.1f} M params), micro-batch {r['micro_batch']} x ({r['image_tokens']} image "
           f"+ {r['cond_tokens']} condition tokens, {r['resolution']} px), {r['precision']}, attention "
           f"{r['attention']}; median of {r['iters']} after {r['warmup']} warm-up. "
           f"Newton-Schulz {r.get('ns_dtype', '?')} x {r.get('ns_steps', '?')}, {r.get('adjust_lr_fn', '?')} scaling; "
           f"AdamW reference: {r.get('adamw', '?')}. The ratios do not depend on the number of blocks "
           f"(both sides grow linearly with it); the goal column judges the per-optimizer-step ratio "
           f"(train.grad_accum = {r['grad_accum']} micro-batches per step) on one device.", ""]
    rows = []
    for s in step_rows(r):
        if s["status"] != "ok":
            rows.append([s["checkpointing"], s["status"], _ms(s["muon_step_ms"]), "-", _ms(s["adamw_step_ms"]), "-",
                         "-", "-"])
            continue
        rows.append([s["checkpointing"], _ms(s["fwd_bwd_ms"]), _ms(s["muon_step_ms"]), _pct(s.get("muon_ratio")),
                     _ms(s["adamw_step_ms"]), _pct(s.get("adamw_ratio")), _pct(s.get("muon_ratio_per_opt_step")),
                     _goal(s.get("goal_met"))])
    out.append(table(step_header(r), rows))
    if r.get("ns_bench_ms") and r.get("muon_ms"):
        out += ["", f"Newton-Schulz alone on this run's {r['muon_matrices']} Muon matrices (each timed "
                f"alone, summed): {_ms(r['ns_bench_ms'])} ms = {r['ns_bench_ms'] / r['muon_ms']:.0%} of the Muon step."]
    if r.get("routing"):
        out += ["", "Routing (build_muon_optimizer, as training): " + "; ".join(x.strip() for x in r["routing"])]
    peaks = {k: v for k, v in r.get("peak_gib", {}).items() if v is not None}
    if peaks:
        out += ["", "Peak allocated GiB: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items())]
    if r.get("owners"):
        fb_full = full_fwd_bwd_ms(r)
        out += ["", f"Newton-Schulz per owner rank, full generator ({r['ns_full_matrices']} Muon matrices, "
                f"{r['full_blocks']} blocks, all: {_ms(r['ns_full_ms'])} ms), matrices assigned as DistributedMuon "
                f"does (`balanced_owners` on `ns_cost`); critical path = the busiest rank's summed per-matrix "
                f"times, 'direct' = that rank's matrices run back to back. fwd+bwd of the full generator estimated "
                f"as the measured one x {r['full_over_bench_flops']:.3f} (FLOP formula) = {_ms(fb_full)} ms per "
                f"micro-batch. Newton-Schulz only (no momentum, update, all-gather or AdamW half).", ""]
        rows = [[str(o["owners"]), f"{_ms(o['per_rank_min_ms'])} .. {_ms(o['critical_ms'])}", _ms(o["critical_ms"]),
                 _ms(o["direct_ms"]), "-" if o["speedup"] is None else f"{o['speedup']:.2f}x",
                 _pct(o.get("ratio_per_opt_step")), _goal(o.get("goal_met"))] for o in owner_rows(r)]
        out.append(table(owner_header(r), rows))
        dp_row = next((o for o in owner_rows(r) if o["owners"] == r["dp"]), None)
        if dp_row and dp_row.get("ratio_per_opt_step") is not None:
            out += ["", f"At the configured layout (dp {r['dp']} owners x tp {r['tp']}; every TP peer runs its "
                    f"owner's Newton-Schulz on the full matrix while doing 1/{r['tp']} of the fwd+bwd, TP "
                    f"communication ignored): ~{_pct(dp_row['ratio_per_opt_step'] * r['tp'])} per GPU per optimizer "
                    f"step (estimate)."]
        out += ["", table(["matrix (example)", "shape", "segments", "count", "ms each", "GFLOP each"],
                          [[m["example"], str(m["shape"]), str(m["segments"] or "-"), str(m["count"]), _ms(m["ms"]),
                            f"{m['gflop']:.4g}"] for m in r["ns_matrices"]])]
    if r.get("error"):
        out += ["", f"ERROR: {r['error']}"]
    return "\n".join(out) + "\n"


def write_outputs(out_dir: str, res: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "muon.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    if "grad_accum" not in res:  # failed before anything was set up
        with open(os.path.join(out_dir, "muon.md"), "w") as f:
            f.write(f"bench_muon_gpu.py failed before measuring: {res.get('error')}\n")
        return
    for name, rows in (("muon_steps.csv", step_rows(res)), ("muon_ns_owners.csv", owner_rows(res))):
        keys = list(dict.fromkeys(k for row in rows for k in row))
        with open(os.path.join(out_dir, name), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=keys)
            wr.writeheader()
            wr.writerows(rows)
    with open(os.path.join(out_dir, "muon.md"), "w") as f:
        f.write(markdown(res))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=XL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes (CPU): checks the script, not the GPU")
    ap.add_argument("--layers", type=int, default=None, help="main blocks to build (default 8; dry run 2)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default data.batch_size of the config")
    ap.add_argument("--checkpointing", default="full,none", help="modes to time fwd+bwd with; the first is "
                    "timed before the optimizers, the rest after (more activation memory)")
    ap.add_argument("--owners", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--dp", type=int, default=32, help="data-parallel owner ranks of the configured run "
                    "(configs/xl.yaml: 64 GPUs / tp 2)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_results"))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device; use --device cpu --dry-run to check the script")
    if not args.device.startswith("cuda") and not args.dry_run:
        ap.error("IOMM-XL shapes on a CPU would take hours: pass --dry-run (toy sizes)")
    if args.dry_run:
        torch.set_num_threads(1)  # toy sizes: idle OpenMP threads only add noise on a shared CPU
    t0 = time.perf_counter()
    res: dict = {}
    try:
        measure(args, res, lambda r: write_outputs(args.out, r))
    except Exception as e:  # record what was measured, then fail
        res["error"] = f"{type(e).__name__}: {e}"[:300]
        write_outputs(args.out, res)
        raise
    finally:
        res["wall_s"] = time.perf_counter() - t0
    write_outputs(args.out, res)
    print(markdown(res))
    print(f"wrote {args.out}/muon.md, muon_steps.csv, muon_ns_owners.csv, muon.json ({res['wall_s']:.1f} s)")
    return res


if __name__ == "__main__":
    main()
