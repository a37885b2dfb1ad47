"""Distributed Muon: Newton-Schulz always on whole matrices (never on a partition slice).

Data parallel (`dp_group`): every rank holds whole parameters and the *averaged* gradients
(DDP / DeepSpeed / a manual all-reduce has already run: this optimizer does not reduce
gradients). Each Muon matrix has one owner rank, chosen by a balanced greedy assignment on the
Newton-Schulz cost (`balanced_owners`); only the owner keeps its momentum and runs the update,
then one all-gather per group and dtype hands every rank the updated matrices. The AdamW half
is elementwise and cheap, so every rank runs it on everything (no communication).

Tensor parallel (`tp_group`): parameters are sharded along their `tp_style` dim (column: rows,
row: columns), fused projections as [q_r | k_r | v_r] (layers.py). The owner's TP peers keep
momentum on their local shard, all-gather the local Nesterov updates over the TP group, rebuild
the full matrix segment by segment, run the same per-block Newton-Schulz as one device (every
TP peer redundantly: the "duplicated" mode) and apply only their local part. The gather is done
in the Newton-Schulz dtype, which changes nothing numerically (Newton-Schulz casts first anyway)
and halves the traffic in bf16.

With TP x DP, pass megatron's (or any) TP and DP groups: ownership is by DP rank, so all TP
peers of a DP rank own the same matrices and their collectives line up.

Equality: given the same gradients, every rank ends with exactly the parameters of the
one-device `MuonWithAdamW` (same Newton-Schulz on the same full matrix; gathers and copies are
exact). tests/optim/test_muon_dist.py proves it on 2 and 4 gloo processes (DP, TP, TP x DP;
TP simulated by slicing each tagged weight and its gradient the way megatron holds them), and
shows that running Newton-Schulz on the local shard instead (DeepSpeed #7807) fails the same
check.

Checkpoints: momentum lives on owners only, so `state_dict()` is per rank (like ZeRO-1); the
ownership is a pure function of the shapes and the DP size, so resuming with the same layout is
exact. Another layout: parallel/reshard.py's layout-free checkpoints send each momentum from its
owner, un-shard it over TP and hand it to the owner under the new layout.

DeepSpeed's own Muon (ZeRO-3): see `deepspeed_muon_config` and docs in it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .muon import NS_DTYPES, MuonWithAdamW, assemble_full, block_intervals, ns_dtype_for


def ns_cost(shape: tuple[int, int], layout: dict | None, steps: int = 5) -> int:
    """Newton-Schulz FLOPs for one full matrix: per block (m = min side, n = max side) and step,
    X X^T (2 m^2 n) + A A (2 m^3) + B X (2 m^2 n)."""
    dim = layout["dim"] if layout else 0
    total = 0
    for _, size in block_intervals(layout, shape):
        rows, cols = (size, shape[1]) if dim == 0 else (shape[0], size)
        m, n = min(rows, cols), max(rows, cols)
        total += steps * (4 * m * m * n + 2 * m ** 3)
    return total


def balanced_owners(costs: list[int], world: int) -> list[int]:
    """Largest-first greedy (LPT): each matrix to the least-loaded rank. Deterministic, so every
    rank computes the same table without communicating."""
    owners, loads = [0] * len(costs), [0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = r
        loads[r] += costs[i]
    return owners


class DistributedMuon(MuonWithAdamW):
    """`MuonWithAdamW` over a data-parallel and/or tensor-parallel process group.

    dp_group      ranks holding replicas (None: no data parallelism)
    tp_group      ranks holding shards of the same tensor-parallel weights (None: none)
    gather_dtype  dtype of the TP gather; default the Newton-Schulz dtype (exact, cheapest)
    Other arguments as `MuonWithAdamW`. Muon groups need `layouts` (from
    `build_muon_param_groups`) for sharded or fused weights.
    """

    def __init__(self, params, *, dp_group: Any = None, tp_group: Any = None, gather_dtype: str | None = None,
                 **kwargs):
        self.dp_group, self.tp_group = dp_group, tp_group
        self.dp_world = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.tp_world = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        if gather_dtype is not None and gather_dtype not in NS_DTYPES:
            raise ValueError(f"gather_dtype must be one of {NS_DTYPES}")
        self.gather_dtype = gather_dtype
        self._owner: dict[int, int] = {}
        super().__init__(params, **kwargs)

    # --- ownership ------------------------------------------------------------------------------
    def _global_shape(self, p: torch.Tensor, layout: dict | None) -> tuple[int, int]:
        shape = list(p.shape)
        if layout and layout.get("tp_dim") is not None:
            shape[layout["tp_dim"]] *= self.tp_world
        return tuple(shape)

    def owners(self, group: dict) -> list[int]:
        """DP owner rank of every parameter of a Muon group (the same table on every rank)."""
        costs = [ns_cost(self._global_shape(p, lay), lay, group["ns_steps"])
                 for p, lay in zip(group["params"], group["layouts"])]
        return balanced_owners(costs, self.dp_world)

    def _owns(self, param: torch.Tensor) -> bool:
        return self._owner[id(param)] == self.dp_rank

    def _shard(self) -> tuple[int, int]:
        return self.tp_world, self.tp_rank

    def _muon_group_step(self, group: dict) -> None:
        self._owner = {id(p): r for p, r in zip(group["params"], self.owners(group))}
        super()._muon_group_step(group)

    # --- tensor parallel: local Nesterov updates -> full matrices -------------------------------
    def _full_updates(self, items: list, updates: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        sharded = [i for i, (_, lay) in enumerate(items) if lay and lay.get("tp_dim") is not None]
        if self.tp_world == 1 or not sharded:
            return updates
        dtype = ns_dtype_for(self.gather_dtype or group["ns_dtype"], updates[sharded[0]].device)
        # One collective for all of this rank's sharded matrices: the TP peers own the same list.
        flat = torch.cat([updates[i].to(dtype).reshape(-1) for i in sharded])
        gathered = [torch.empty_like(flat) for _ in range(self.tp_world)]
        dist.all_gather(gathered, flat, group=self.tp_group)
        fulls, offset = list(updates), 0
        for i in sharded:
            local = updates[i]
            chunks = [g[offset:offset + local.numel()].view(local.shape) for g in gathered]
            fulls[i] = assemble_full(chunks, items[i][1])
            offset += local.numel()
        return fulls

    # --- data parallel: owners hand their updated matrices to everyone --------------------------
    def _after_muon_group(self, group: dict, stepped: list[torch.Tensor]) -> None:
        if self.dp_world == 1:
            return
        # Grads are all-reduced, so "has a grad" is the same on every rank: so is this table.
        params = [p for p in group["params"] if p.grad is not None]
        for dtype in sorted({p.dtype for p in params}, key=str):
            per_rank = [[p for p in params if p.dtype == dtype and self._owner[id(p)] == r]
                        for r in range(self.dp_world)]
            sizes = [sum(p.numel() for p in ps) for ps in per_rank]
            if max(sizes) == 0:
                continue
            mine = per_rank[self.dp_rank]
            buf = torch.zeros(max(sizes), dtype=dtype, device=params[0].device)
            if mine:
                torch.cat([p.detach().reshape(-1) for p in mine], out=buf[:sizes[self.dp_rank]])
            gathered = [torch.empty_like(buf) for _ in range(self.dp_world)]
            dist.all_gather(gathered, buf, group=self.dp_group)
            for r, ps in enumerate(per_rank):
                if r == self.dp_rank:
                    continue
                offset = 0
                for p in ps:
                    p.detach().copy_(gathered[r][offset:offset + p.numel()].view_as(p))
                    offset += p.numel()


# ----------------------------------------------------------------------------------------------
# DeepSpeed's built-in Muon (ZeRO-3)
# ----------------------------------------------------------------------------------------------
def deepspeed_muon_config(*, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                          adam_lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                          ns_method: str = "gram",
                          per_head_muon: bool = False, zero_stage: int = 3, micro_batch: int = 1,
                          grad_accum: int = 1, gradient_clipping: float = 0.0, bf16: bool = False) -> dict:
    """A DeepSpeed config using DeepSpeed's built-in Muon (deepspeed>=0.18; checked on 0.19.8).

    What it is (read from deepspeed/runtime/zero/muon, stage3.py and engine.py, and run with 2
    processes under ZeRO-3 in tests/optim/test_muon_dist.py):
      * ZeRO-3 all-gathers each Muon parameter's averaged gradient and momentum, runs
        Newton-Schulz on the *full* matrix (round-robin over ranks), and writes back the local
        partitions: the parameters after 3 steps equal the same optimizer on one process
        (the #7807 slice bug is not present in 0.19.8). ZeRO-3 + Muon requires
        "reduce_scatter": false (asserted in stage3.py), set here.
      * Its semantics are not ours: routing is by name only (`set_optimizer_flags`: every >=2-D
        parameter whose name lacks "embed"/"lm_head" goes to Muon -- so FLUX's proj_out,
        norm_out_mod and AdaLN modulation do too, and `deepspeed.initialize` overwrites any
        `use_muon` tags you set); fused q|k|v is orthogonalised as one matrix (per-head only via
        `per_head_muon`, never per q/k/v segment); the update scale is only Keller's
        sqrt(max(1, rows/cols)) (no match_rms_adamw); Newton-Schulz is "gram" (fp16, or fp32
        where the CPU lacks fp16 matmul -- as on our CPU machine) or "standard" (bf16), with the
        normalisation X / (||X|| + 1e-7); and both kernels are torch.compile'd (set
        TORCH_COMPILE_DISABLE=1 on CPU test machines to skip inductor).
      * Gradient clipping covers the Muon *update*: ZeRO 1-3 orthogonalise before the norm, so
        "gradient_clipping" clips the global norm of the orthogonalised updates (each ~sqrt(min
        side)) with the AdamW gradients. Keep it 0 (the launchers refuse optim.grad_clip > 0).
      * Under megatron tensor parallelism it would orthogonalise each rank's TP shard.
      * The Adam half is DeepSpeed's FusedAdam / CPUAdam, or torch.optim.AdamW with
        "torch_adam": true (set here, so the AdamW side equals torch's). Both halves share one
        weight_decay (a param group's own value overrides it for both halves, not one).
      * On CPU, `deepspeed.initialize` -> `init_distributed` constructs its TorchBackend, which
        JIT-builds the shared-memory allreduce op (~66 s on 2 cores) even when torch.distributed
        is already initialised (checked: initialising gloo first, or dist_backend="gloo", still
        builds it). Skip it with `deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False`
        before initialize (collectives then go through gloo), or prebuild the op.
    Use it when DeepSpeed ZeRO-3 is the engine and its routing is acceptable; use
    `DistributedMuon` (our routing and per-segment fused handling) with DDP / ZeRO-1-style
    sharding and megatron TP.
    """
    if ns_method not in ("gram", "standard"):
        raise ValueError("ns_method must be 'gram' or 'standard'")
    params = {"lr": lr, "muon_lr": lr, "adam_lr": adam_lr, "momentum": momentum, "weight_decay": weight_decay,
              "betas": list(betas), "eps": eps, "ns_method": ns_method, "torch_adam": True}
    if per_head_muon:
        params["per_head_muon"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": gradient_clipping,  # DeepSpeed's default is 1.0: make it explicit
        "optimizer": {"type": "muon", "params": params},
        "zero_optimization": {"stage": zero_stage, "reduce_scatter": False},
        "bf16": {"enabled": bf16},
    }
    return cfg
