"""Layout-free checkpoints: save under one (tp, pp, dp, ZeRO stage), resume under another.

DeepSpeed's engine checkpoints (`ParallelRuntime.save/load`) are per layout: ZeRO
partitions and megatron TP shards are baked into the files. `save_full` writes instead,
for every trainable parameter, its single-device fp32 value and Adam moments
(`exp_avg`, `exp_avg_sq`), under its single-device name, plus the step counters, and
the EMA's full fp32 tensors when the run keeps one (`parallel/ema.py`; key "ema"):

    <dir>/full_pp{stage}.pt     one file per pipeline stage (each owns distinct names),
                                written by the stage's (tp 0, dp 0) rank

Gathering uses DeepSpeed's documented `safe_get_full_fp32_param` /
`safe_get_full_optimizer_state` (collective over the DP group, any ZeRO stage) and the
TP un-sharding of `tensor_parallel` (fused segments respected). Loading shards the other
way: parameters are written into the module before the engine exists (so ZeRO builds its
fp32 master partitions from them), optimizer moments after, with
`safe_set_full_optimizer_state` (ZeRO 1-3) or directly (ZeRO 0).

Our Muon (`DistributedMuon` / `MuonWithAdamW`, ZeRO-0, any tp x dp): each Muon matrix's
momentum lives on its data-parallel owner only, as TP shards; `full_state` sends it from the
owner to its DP peers, un-shards it over TP and writes it under "momentum_buffer" (the AdamW half
keeps `exp_avg` / `exp_avg_sq`); loading cuts it for the new layout and hands it to the matrix's
new owner (ownership is a function of the shapes and the DP size). A checkpoint records which
optimizer wrote it ("optimizer": "adam" / "muon"), and a resume with the other one is refused.

Frozen parts (MLLM, VAE) are not written: they come from their source (path or seeded
random init) in every layout. Optimizers other than Adam-style ones and our Muon need their
state keys listed in `OPT_KEYS`.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn

from .tensor_parallel import is_tp_layer, shard_tensor, unshard_tensors

OPT_KEYS = ("exp_avg", "exp_avg_sq")
MUON_KEY = "momentum_buffer"  # our Muon's state of a Muon matrix (its AdamW half: OPT_KEYS)


def _tp_info(module: nn.Module) -> dict[str, tuple]:
    """param name -> (sharded dim, fused sizes) for TP-sharded params."""
    out = {}
    for mname, m in module.named_modules():
        if not is_tp_layer(m):
            continue
        for leaf, p in m.named_parameters(recurse=False):
            if leaf == "bias" and m.tp_style == "row":
                continue
            dim = 0 if (m.tp_style == "column" or leaf == "bias") else 1
            out[f"{mname}.{leaf}" if mname else leaf] = (dim, m.tp_fused_sizes)
    return out


def _inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _zero_stage(engine) -> int:
    return engine.zero_optimization_stage()


def _stage0_masters(engine) -> dict[int, torch.Tensor]:
    """ZeRO-0 with bf16 / fp16: DeepSpeed's wrapper (FP16_UnfusedOptimizer) keeps an fp32 master
    copy of each low-precision parameter, and the inner optimizer's state is keyed by those
    masters. {id(module parameter): its master}; empty without a wrapper (fp32: the parameters
    are the optimizer's own)."""
    opt = engine.optimizer
    low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if not low or not high:
        return {}
    return {id(p): m for lg, hg in zip(low, high) for p, m in zip(lg, hg)}


def _tp_gather(t: torch.Tensor, spec, group, tp: int) -> torch.Tensor:
    if spec is None or tp == 1:
        return t
    shards = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(shards, t.contiguous(), group=group)
    return unshard_tensors(shards, spec[0], spec[1])


def _muon_owners(engine) -> dict[int, int] | None:
    """{id(Muon matrix): its DP owner rank} when the engine's optimizer is our Muon (one process:
    rank 0 owns everything), else None."""
    from .runtime import our_muon

    muon = our_muon(engine)
    if muon is None:
        return None
    owners: dict[int, int] = {}
    for group in muon.param_groups:
        if group["use_muon"]:
            ranks = muon.owners(group) if hasattr(muon, "owners") else [0] * len(group["params"])
            owners.update({id(p): r for p, r in zip(group["params"], ranks)})
    return owners


def _from_owner(t: torch.Tensor | None, like: torch.Tensor, owner: int, lay) -> torch.Tensor:
    """The owner's tensor (None there: zeros, i.e. no momentum yet) on every rank of its DP group."""
    out = t.detach().float().clone() if t is not None and lay.dp_rank == owner else torch.zeros_like(like).float()
    if lay.dp > 1:
        group = lay.dp_group()
        dist.broadcast(out, src=dist.get_global_rank(group, owner), group=group)
    return out


def _own_cpu_copy(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """t on the CPU, never sharing memory with `source` (a live weight or moment): at ZeRO-0 on
    CPU with tp 1, .float() and .cpu() hand back the live tensor itself, which a caller keeping
    the dict would then see change with the next step."""
    out = t.cpu()
    return out.clone() if out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else out


def full_state(rt, with_moments: bool = True, with_ema: bool | None = None) -> dict:
    """{"params": {name: full fp32}, "exp_avg": {...}, "exp_avg_sq": {...}} for the trainable
    parameters this rank's stage owns, single-device shapes and names (+ "ema": {name: full
    fp32} and "ema_decay" when the runtime keeps an EMA; `with_ema` defaults to `with_moments`).
    Collective over the DP and TP groups (every rank gets the full tensors), each the caller's
    own copy."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine, lay = rt.engine, rt.layout
    tp_group = lay.tp_group()
    specs = _tp_info(rt.module)
    stage = _zero_stage(engine)
    opt = _inner_optimizer(engine)
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    masters = _stage0_masters(engine) if stage == 0 else {}
    owners = _muon_owners(engine) or {}
    if owners and stage != 0:
        raise ValueError("our Muon runs at ZeRO-0 only (muon_launch_errors)")
    out = {"params": {}, **{k: {} for k in OPT_KEYS}, "optimizer": "muon" if owners else "adam"}
    if owners:
        out[MUON_KEY] = {}
    for name, p in rt.module.named_parameters():
        if not p.requires_grad:
            continue
        if stage == 0:
            master = masters.get(id(p), p)  # bf16: the fp32 master, which the moments are keyed by
            value = master.detach().float()
            state = opt.state.get(master, {})
            if id(p) in owners:
                moments = {MUON_KEY: _from_owner(state.get(MUON_KEY), value, owners[id(p)], lay)}
            else:
                moments = {k: state[k].detach().float() if k in state else torch.zeros_like(value) for k in OPT_KEYS}
        else:
            value = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in OPT_KEYS} if with_moments else {}
        spec = specs.get(name)
        # gathered where they live (NCCL takes device tensors only), then kept on the CPU
        out["params"][name] = _own_cpu_copy(_tp_gather(value, spec, tp_group, lay.tp), value)
        if with_moments:
            for k, v in moments.items():
                out[k][name] = _own_cpu_copy(_tp_gather(v, spec, tp_group, lay.tp), v)
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    out["optimizer_step"] = int(float(steps[0])) if steps else 0
    out["iomm_step"] = rt.step
    out["layout"] = {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": stage}
    ema = getattr(rt, "ema", None)
    if ema is not None and (with_moments if with_ema is None else with_ema):
        out["ema"] = ema.full(rt.module)
        out["ema_decay"] = ema.decay
    return out


def save_full(rt, save_dir: str) -> str | None:
    """Collective over all ranks. Returns the file this rank wrote (or None). The stages write
    into `<save_dir>.tmp/`, which then replaces `save_dir` whole: the directory only ever holds
    one save (a pp=1 save over a pp=2 one left the old `full_pp1.pt` beside the new
    `full_pp0.pt`, which read back as a mix of the two runs)."""
    from ..train.checkpoint import atomic_save, replace_dir

    out = full_state(rt)
    lay = rt.layout
    save_dir = os.path.normpath(save_dir)
    staging = save_dir + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    path = None
    if lay.tp_rank == 0 and lay.dp_rank == 0:
        name = f"full_pp{lay.pp_rank}.pt"
        atomic_save(out, os.path.join(staging, name))
        path = os.path.join(save_dir, name)
    dist.barrier()
    if dist.get_rank() == 0:
        replace_dir(staging, save_dir)
    dist.barrier()
    return path


def _read_all(load_dir: str) -> dict:
    from ..train.checkpoint import read_full_parts

    merged = {"params": {}, **{k: {} for k in OPT_KEYS}, "optimizer": "adam"}
    for part in read_full_parts(load_dir):
        for key in ("params", *OPT_KEYS, MUON_KEY):
            if key in part:
                merged.setdefault(key, {}).update(part[key])
        merged["optimizer"] = part.get("optimizer", "adam")  # saves before Muon support: Adam
        if "ema" in part:
            merged.setdefault("ema", {}).update(part["ema"])
            merged["ema_decay"] = part.get("ema_decay")
        merged["optimizer_step"] = part["optimizer_step"]
        merged["iomm_step"] = part["iomm_step"]
        merged["layout"] = part["layout"]
    return merged


def _local(module, name, full, specs):
    spec = specs.get(name)
    if spec is None:
        return full
    from megatron.core import parallel_state as ps

    return shard_tensor(full, spec[0], spec[1], ps.get_tensor_model_parallel_world_size(),
                        ps.get_tensor_model_parallel_rank())


def load_full_params(module: nn.Module, load_dir: str) -> int:
    """Write the checkpoint's parameters (sharded for this rank) into `module` before the
    engine is built. Returns how many were loaded; missing trainable ones are an error."""
    from ..train.checkpoint import CheckpointError, check_finite

    data = _read_all(load_dir)
    check_finite(data["params"], f"layout-free checkpoint {load_dir}")
    specs = _tp_info(module)
    n, missing = 0, []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if name not in data["params"]:
                missing.append(name)
                continue
            p.copy_(_local(module, name, data["params"][name], specs).to(p.dtype))
            n += 1
    if missing:
        raise CheckpointError(f"layout-free checkpoint {load_dir} lacks {len(missing)} trainable parameters, e.g. "
                              f"{missing[:3]} (another model config?)")
    # a name no rank's stage trains (another model config: a block more, ...) would be dropped
    mine = [name for name, p in module.named_parameters() if p.requires_grad]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    unknown = sorted(set(data["params"]) - {name for names in everyone for name in names})
    if unknown:
        raise CheckpointError(f"layout-free checkpoint {load_dir} has {len(unknown)} parameters this model does not "
                              f"train, e.g. {unknown[:3]} (another model config?)")
    return n


def load_full_optimizer(rt, load_dir: str) -> int:
    """Optimizer moments and step counters into the live engine; returns the run step."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from ..train.checkpoint import CheckpointError

    data = _read_all(load_dir)
    engine = rt.engine
    opt = _inner_optimizer(engine)
    stage = _zero_stage(engine)
    owners = _muon_owners(engine)
    if (owners is not None) != (data["optimizer"] == "muon"):
        saved = "Muon" if data["optimizer"] == "muon" else "Adam"
        ours = "Muon" if owners is not None else type(opt).__name__
        raise CheckpointError(f"layout-free checkpoint {load_dir} was written by a {saved} run, this run's optimizer "
                              f"is {ours}: the optimizer state does not carry over (start from its weights with "
                              "train.init_from)")
    owners = owners or {}
    step = torch.tensor(float(data["optimizer_step"]))
    # The tensors the inner optimizer keeps state for: ZeRO-3's flat fp32 partitions (its
    # param_groups only point at them while step() runs), ZeRO-1/2's fp32 partitions, or
    # the parameters themselves without ZeRO.
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) \
        or getattr(engine.optimizer, "single_partition_of_fp32_groups", None) \
        or [p for g in opt.param_groups for p in g["params"]]
    for p in flat:
        if id(p) in owners:  # a Muon matrix: momentum only (below), on its owner
            continue
        state = opt.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = step.clone()
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    specs = _tp_info(rt.module)
    masters = _stage0_masters(engine) if stage == 0 else {}
    with torch.no_grad():
        for name, p in rt.module.named_parameters():
            if not p.requires_grad:
                continue
            if p.dtype != torch.float32:
                # bf16 / fp16 parameters: the engine built its fp32 masters from the rounded
                # module parameters (load_full_params); put the saved fp32 values back
                value = _local(rt.module, name, data["params"][name], specs)
                if stage == 0:
                    masters[id(p)].copy_(value)
                else:
                    safe_set_full_fp32_param(p, value.to(p.device).float())
            if id(p) in owners:
                state = opt.state[p]
                if owners[id(p)] == rt.layout.dp_rank:
                    state[MUON_KEY] = torch.empty_like(p).copy_(_local(rt.module, name, data[MUON_KEY][name], specs))
                else:  # another rank owns it under this layout
                    state.pop(MUON_KEY, None)
                continue
            for k in OPT_KEYS:
                value = _local(rt.module, name, data[k][name], specs)
                if stage == 0:
                    state = opt.state[masters.get(id(p), p)]
                    state[k].copy_(value.to(state[k].dtype))
                else:
                    safe_set_full_optimizer_state(p, value.to(p.device), k)
    engine.global_steps = int(data["iomm_step"])
    return int(data["iomm_step"])


def load_full_ema(rt, load_dir: str) -> bool:
    """The checkpoint's EMA, sharded for this rank, into `rt.ema`. True if it had one; False if
    it was saved without an EMA (the EMA then starts from the loaded weights)."""
    data = _read_all(load_dir)
    if "ema" not in data:
        rt.ema.reset()
        return False
    rt.ema.load_full(rt.module, data["ema"], source=load_dir)
    return True
