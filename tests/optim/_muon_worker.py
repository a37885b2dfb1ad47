"""Worker for tests/optim/test_muon_dist.py: run with torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node N tests/optim/_muon_worker.py --out R.json \
        --checks dp,tp,tp_dp,deepspeed

Every check trains the tiny FLUX model for STEPS steps and compares the parameters with the
one-device `MuonWithAdamW` run computed in the same process (same seed, full batch). Each check
reports `max_rel` = max over parameters of max|p - p_ref| / max|p_ref|, and whether all ranks
hold the same bits. `*_per_shard` checks run Newton-Schulz on the local TP shard (no gather,
the DeepSpeed #7807 pattern) and must come out far from the reference.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from iomm_scale.models.flux_mmdit import FluxConfig, FluxMMDiT
from iomm_scale.optim.muon import MuonWithAdamW, assemble_full, build_muon_param_groups, shard_pieces
from iomm_scale.optim.muon_dist import DistributedMuon, balanced_owners, deepspeed_muon_config, ns_cost

STEPS = 3
BATCH = 4  # global batch, divisible by 1, 2 and 4 data-parallel ranks
CFG = FluxConfig(num_layers=1, num_single_layers=1, num_heads=2, head_dim=16, context_dim=32, pooled_dim=32,
                 axes_dims_rope=(4, 6, 6), in_channels=64)
# Our optimizer's settings for the checks: every layout path (fused segments, heads, AdaLN chunks).
ROUTING = dict(modulation="muon", per_head=True)
OPT = dict(lr=0.02, weight_decay=0.1, ns_dtype="float32", adjust_lr_fn="match_rms_adamw", adamw_lr=1e-3,
           adamw_weight_decay=0.1)


def make_model() -> FluxMMDiT:
    torch.manual_seed(0)
    return FluxMMDiT(CFG)


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield (torch.randn(BATCH, 16, 4, 4, generator=g), torch.rand(BATCH, generator=g),
               torch.randn(BATCH, 3, 32, generator=g), torch.randn(BATCH, 16, 4, 4, generator=g))


def loss_fn(model, batch, lo=0, hi=BATCH):
    x, t, cond, target = (b[lo:hi] for b in batch)
    return F.mse_loss(model(x, t, cond), target)


def reference(routing=ROUTING, opt=OPT) -> tuple[dict, list[float]]:
    model = make_model()
    optim = MuonWithAdamW(build_muon_param_groups(model, **routing), **opt)
    losses = []
    for batch in batches():
        optim.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses


def compare(params: dict, ref: dict) -> float:
    return max(((params[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-30)).item() for n in ref)


def ranks_agree(params: dict) -> bool:
    """All ranks hold exactly the same bits (a sum of squares of the flat vector would hide swaps)."""
    flat = torch.cat([params[n].reshape(-1) for n in sorted(params)])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(o, out[0]) for o in out)


def average_grads(model, group, world):
    for p in model.parameters():
        if p.grad is not None and world > 1:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(world)


# ----------------------------------------------------------------------------------------------
def check_dp(ref, dp_group, exact_grads=False, resume_after=None) -> dict:
    """Data parallel: whole params everywhere, each rank its slice of the batch and averaged
    gradients, owners run NS. exact_grads: every rank computes the full-batch gradient instead,
    so the optimizer gets the reference's bits and any difference is the optimizer's own.
    resume_after=k: after step k, save every rank's optimizer state (momentum of its own
    matrices only), build a fresh optimizer and load it."""
    world, rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    model = make_model()
    optim = DistributedMuon(build_muon_param_groups(model, **ROUTING), dp_group=dp_group, **OPT)
    per = BATCH // world
    for step, batch in enumerate(batches()):
        if step == resume_after:
            buf = io.BytesIO()
            torch.save(optim.state_dict(), buf)
            buf.seek(0)
            optim = DistributedMuon(build_muon_param_groups(model, **ROUTING), dp_group=dp_group, **OPT)
            optim.load_state_dict(torch.load(buf, weights_only=True))
        optim.zero_grad()
        if exact_grads:
            loss_fn(model, batch).backward()
        else:
            loss_fn(model, batch, rank * per, (rank + 1) * per).backward()
            average_grads(model, dp_group, world)
        optim.step()
    params = {n: p.detach() for n, p in model.named_parameters()}
    if resume_after is not None:
        return params
    muon = optim.param_groups[0]
    owned = [p.numel() for p, r in zip(muon["params"], optim.owners(muon)) if r == rank]
    resumed = check_dp(ref, dp_group, exact_grads, resume_after=1)
    return {"max_rel": compare(params, ref), "ranks_agree": ranks_agree(params),
            "resume_bitwise": all(torch.equal(resumed[n], params[n]) for n in params),
            "owned_tensors": len(owned), "momentum_buffers": sum("momentum_buffer" in optim.state[p]
                                                                  for p in muon["params"])}


def _shard(full: torch.Tensor, layout, tp_world, tp_rank) -> torch.Tensor:
    dim = layout["dim"]
    pieces = shard_pieces(layout, full.size(dim), tp_world, tp_rank)
    return torch.cat([full.narrow(dim, g, n) for g, _, n in pieces], dim)


def check_tp(ref, tp_group, dp_group, per_shard=False) -> dict:
    """Tensor parallel, simulated: every rank keeps the full model to compute gradients (its DP
    slice of the batch), but the optimizer only sees the local shards of every tagged linear
    (sliced per tp_style / tp_fused_sizes as megatron would hold them). After each step the
    shards are all-gathered back into the full model."""
    tp_world, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    dp_world = dist.get_world_size(dp_group) if dp_group is not None else 1
    dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
    model = make_model()
    groups = build_muon_param_groups(model, **ROUTING)
    modules = dict(model.named_modules())
    # Sharding layout of every parameter (weights and column-parallel biases), from the tags.
    shard_layout = {}
    for name, _ in model.named_parameters():
        mod_name, pname = name.rsplit(".", 1)
        mod = modules[mod_name]
        style = getattr(mod, "tp_style", None)
        if style == "column" or (style == "row" and pname == "weight"):
            dim = 0 if style == "column" else 1
            shard_layout[name] = {"dim": dim, "segments": list(mod.tp_fused_sizes) if mod.tp_fused_sizes else None,
                                  "tp_dim": dim}
    full = dict(model.named_parameters())
    local = {}
    for g in groups:
        for i, (name, p) in enumerate(zip(g["param_names"], g["params"])):
            lay = shard_layout.get(name)
            local[name] = torch.nn.Parameter(_shard(p.detach(), lay, tp_world, tp_rank) if lay else p.detach().clone())
            g["params"][i] = local[name]
            if per_shard and g["use_muon"] and lay:
                # The #7807 pattern: treat the local shard as the whole matrix (segments scaled to it).
                layout = dict(g["layouts"][i])
                if layout.get("segments"):
                    layout["segments"] = [s // tp_world for s in layout["segments"]]
                layout["tp_dim"], layout["blocks"] = None, None
                g["layouts"][i] = layout
    optim = DistributedMuon(groups, dp_group=dp_group, tp_group=None if per_shard else tp_group, **OPT)
    per = BATCH // dp_world
    for batch in batches():
        model.zero_grad()
        loss_fn(model, batch, dp_rank * per, (dp_rank + 1) * per).backward()
        average_grads(model, dp_group, dp_world)
        for name, p in local.items():
            lay = shard_layout.get(name)
            p.grad = _shard(full[name].grad, lay, tp_world, tp_rank) if lay else full[name].grad.clone()
        optim.step()
        with torch.no_grad():  # rebuild the full weights from the shards
            for name, p in local.items():
                lay = shard_layout.get(name)
                if lay:
                    chunks = [torch.empty_like(p) for _ in range(tp_world)]
                    dist.all_gather(chunks, p.detach().contiguous(), group=tp_group)
                    full[name].copy_(assemble_full(chunks, lay))
                else:
                    full[name].copy_(p)
    params = {n: p.detach() for n, p in model.named_parameters()}
    return {"max_rel": compare(params, ref), "ranks_agree": ranks_agree(params)}


# ----------------------------------------------------------------------------------------------
def check_deepspeed() -> dict:
    """DeepSpeed 0.19.8's built-in Muon under ZeRO-3 (2+ processes, params really partitioned)
    against DeepSpeed's own Muon on one device without ZeRO (`MuonWithAuxAdam` with
    torch.optim.AdamW as its Adam, exactly what the engine builds: the same `muon_update` on
    whole matrices). Every rank feeds the full batch, so the averaged gradient
    is bitwise the one-device gradient and any difference is the optimizer's. Also reports the
    distance to our MuonWithAdamW configured with DeepSpeed's routing and whole-matrix fp32 NS
    (`max_rel_vs_ours_ds_semantics`) and with our own routing (`max_rel_vs_ours`)."""
    import deepspeed
    import deepspeed.ops

    # init_distributed builds DeepSpeed's CPU shared-memory allreduce op (a ~66 s JIT compile on
    # 2 cores). gloo does the collectives here, so mark the op unavailable instead of building it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
    from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

    world = dist.get_world_size()
    lr, wd, adam_lr, betas, eps = 0.02, 0.1, 1e-3, (0.9, 0.999), 1e-8

    def ds_rule(name, p):  # deepspeed.set_optimizer_flags
        return "muon" if p.ndim >= 2 and not any(k in name.lower() for k in ("embed", "lm_head")) else "adamw"

    # DeepSpeed's one-device Muon.
    model = make_model()
    named = list(model.named_parameters())
    ref_opt = MuonWithAuxAdam([
        dict(params=[p for n, p in named if ds_rule(n, p) == "muon"], use_muon=True, lr=lr, momentum=0.95,
             weight_decay=wd, ns_method="gram"),
        dict(params=[p for n, p in named if ds_rule(n, p) == "adamw"], use_muon=False, lr=adam_lr, betas=betas,
             eps=eps, weight_decay=wd)], adam_optimizer=torch.optim.AdamW)
    ref_losses, ref_steps = [], []
    for batch in batches():
        ref_opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        ref_opt.step()
        ref_losses.append(loss.item())
        ref_steps.append({n: p.detach().clone() for n, p in named})
    ref = ref_steps[-1]
    muon_names = [n for n, p in named if ds_rule(n, p) == "muon"]
    ours_ds, _ = reference(dict(split_fused=False, override=ds_rule),
                           dict(lr=lr, weight_decay=wd, ns_dtype="float32", adjust_lr_fn="original",
                                adamw_lr=adam_lr, adamw_betas=betas, adamw_eps=eps, adamw_weight_decay=wd))
    ours, _ = reference()

    cfg = deepspeed_muon_config(lr=lr, weight_decay=wd, adam_lr=adam_lr, betas=betas, eps=eps, micro_batch=BATCH)
    cfg["train_batch_size"] = BATCH * world
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # really partition small params
    cfg["steps_per_print"] = 10 ** 9
    model = make_model()
    engine, optimizer, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    losses, muon_steps = [], []
    for step, batch in enumerate(batches()):
        loss = loss_fn(engine, batch)  # the full batch on every rank: see the docstring
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
        muon_steps.append(compare({n: params[n] for n in muon_names}, {n: ref_steps[step][n] for n in muon_names}))
    return {"max_rel": compare(params, ref), "max_rel_muon": muon_steps[-1], "max_rel_muon_per_step": muon_steps,
            "max_rel_vs_ours_ds_semantics": compare(params, ours_ds), "max_rel_vs_ours": compare(params, ours),
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)), "ranks_agree": ranks_agree(params),
            "ns_dtype": str(ns_compute_dtype("gram")), "muon_tensors": len(muon_names),
            "zero_stage": engine.zero_optimization_stage(), "optimizer": type(optimizer).__name__,
            "inner": type(optimizer.optimizer).__name__,
            "aux": type(getattr(optimizer.optimizer, "aux_optimizer", None)).__name__,
            "partition_numel": sorted({p.ds_tensor.numel() for p in model.parameters()})[-3:]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--checks", default="dp,tp")
    args = ap.parse_args()
    torch.set_num_threads(1)  # N processes share 2 cores
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    checks = args.checks.split(",")
    ref, _ = reference()
    results = {"world": world}
    if "dp" in checks:
        results["dp"] = check_dp(ref, dist.group.WORLD)
        results["dp_exact_grads"] = check_dp(ref, dist.group.WORLD, exact_grads=True)
    if "tp" in checks:
        results["tp"] = check_tp(ref, dist.group.WORLD, None)
        results["tp_per_shard"] = check_tp(ref, dist.group.WORLD, None, per_shard=True)
    if "tp_dp" in checks:  # TP=2 inner, DP=world/2 outer: ranks (0,1) (2,3) are TP groups
        tp_groups = [dist.new_group(list(range(i, i + 2))) for i in range(0, world, 2)]
        dp_groups = [dist.new_group(list(range(j, world, 2))) for j in range(2)]
        tp_group, dp_group = tp_groups[rank // 2], dp_groups[rank % 2]
        results["tp_dp"] = check_tp(ref, tp_group, dp_group)
        results["tp_dp_per_shard"] = check_tp(ref, tp_group, dp_group, per_shard=True)
    if "deepspeed" in checks:
        results["deepspeed"] = check_deepspeed()
    # The ownership table the benchmark and docs quote.
    model = make_model()
    muon = build_muon_param_groups(model, **ROUTING)[0]
    costs = [ns_cost(tuple(p.shape), lay) for p, lay in zip(muon["params"], muon["layouts"])]
    owners = balanced_owners(costs, world)
    results["ns_cost_per_rank"] = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"ranks": gathered}, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
