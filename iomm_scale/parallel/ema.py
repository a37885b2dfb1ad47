"""EMA of the trainable parameters for the multi-process loop (`DistributedTrainer`).

The single-process trainer keeps `optim/builder.EMA` (an fp32 copy of every trainable
parameter, `shadow.lerp_(p, 1 - decay)` after each optimizer step). `DistributedEMA` is the
same maths, sharded like ZeRO-3 shards parameters: every data-parallel rank keeps the EMA of
its 1/dp slice of each trainable tensor it holds (its TP shard, its pipeline stage's
parameters), cut by DeepSpeed's ZeRO-3 rule (flattened, padded to a multiple of dp, rank r
owns elements [r * ceil(n/dp), (r+1) * ceil(n/dp)), padding not stored):

    ZeRO-3      the slice *is* the rank's parameter partition, DeepSpeed's `param.ds_tensor`
                (host memory with `offload_params`)
    ZeRO 0-2    every rank holds the whole updated parameter after `engine.step()`, and
                lerps only its slice of it

So at every ZeRO stage the update is local (no communication) and EMA memory per rank is
4 B x (the rank's trainable parameters) / dp - the memory planner's `ema` term. Always fp32
whatever the parameters' dtype (DeepSpeed's bf16 mode: the bf16 values the engine computes
with, upcast; docs/PARALLEL.md). Frozen parameters (MLLM, VAE, a LoRA base) never get an EMA.
Updated only when DeepSpeed applied the step (`was_step_applied`).

Checkpoints:
  same layout   every rank's `ema_pp{p}_tp{t}_dp{d}.pt` in the DeepSpeed checkpoint's tag
                directory, written (tmp + fsync + rename) *before* DeepSpeed writes `latest`, so
                `latest` never names a tag without them; reloads under the same tp, pp and dp
                (any ZeRO stage: the slices do not depend on it)
  any layout    `full_pp{s}.pt` of `reshard.save_full` carries "ema" (full single-device
                tensors, gathered over DP and TP); `resume_full` re-slices it
  export        `export_ema(rt, out_dir)`: rank 0 writes `ema.safetensors` (the full EMA state
                dict under single-process names) and `state.pt` (the single-process
                checkpoint format: live weights + EMA), which `iomm-sample --checkpoint` and
                `train.init_from` read
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn


def dp_slice_bounds(numel: int, dp: int, dp_rank: int) -> tuple[int, int, int]:
    """(slice size, start, valid elements) of data-parallel rank `dp_rank` in a flattened
    tensor of `numel` elements: DeepSpeed ZeRO-3's partitioning (size = ceil(numel / dp))."""
    size = -(-numel // dp)
    start = dp_rank * size
    return size, start, max(0, min(size, numel - start))


class DistributedEMA:
    """fp32 EMA of `module`'s trainable parameters, this rank's 1/dp slice of each (module doc)."""

    def __init__(self, module: nn.Module, decay: float, *, zero_stage: int, layout):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.zero_stage = int(zero_stage)
        self.layout = layout
        self.dp, self.dp_rank = layout.dp, layout.dp_rank
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shapes: dict[str, torch.Size] = {}
        self.bounds: dict[str, tuple[int, int, int]] = {}
        for n, p in self.params.items():
            if self.zero_stage == 3:
                if getattr(p, "ds_tensor", None) is None:
                    raise RuntimeError(f"ZeRO-3 EMA: {n} has no DeepSpeed partition")
                group = p.ds_process_group
                if (dist.get_world_size(group=group), dist.get_rank(group=group)) != (self.dp, self.dp_rank):
                    raise RuntimeError(f"ZeRO-3 EMA: {n} is partitioned over a group other than the data-parallel one")
                shape, numel = p.ds_shape, int(p.ds_numel)
                if int(p.ds_tensor.ds_numel) != -(-numel // self.dp):
                    raise RuntimeError(f"ZeRO-3 EMA: {n}'s partition size {p.ds_tensor.ds_numel} is not "
                                       f"ceil({numel} / {self.dp})")
            else:
                shape, numel = p.shape, p.numel()
            self.shapes[n] = torch.Size(shape)
            self.bounds[n] = dp_slice_bounds(numel, self.dp, self.dp_rank)
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset()

    # ---- the rank's tensors ----------------------------------------------------------
    def _local(self, n: str) -> torch.Tensor:
        """This rank's slice of parameter `n` as it holds it: its ZeRO-3 partition (padding
        dropped), or the slice of its whole local parameter (TP shard / stage)."""
        p = self.params[n]
        _, start, valid = self.bounds[n]
        if self.zero_stage == 3:
            return p.ds_tensor.detach().narrow(0, 0, valid)
        return p.detach().reshape(-1).narrow(0, min(start, p.numel()), valid)

    @torch.no_grad()
    def reset(self) -> None:
        """Shadow := the current parameters (start of a run, or a checkpoint without an EMA)."""
        self.shadow = {n: self._local(n).to(torch.float32, copy=True) for n in self.params}

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- shadow + (1 - decay) (p - shadow), the single-process EMA's lerp_."""
        weight = 1.0 - self.decay
        fp32_s, fp32_v = [], []
        for n in self.params:
            v, s = self._local(n), self.shadow[n]
            if v.dtype == torch.float32 and v.device == s.device:
                fp32_s.append(s)
                fp32_v.append(v)
            else:
                s.lerp_(v.to(device=s.device, dtype=torch.float32), weight)
        if fp32_s:
            torch._foreach_lerp_(fp32_s, fp32_v, weight)

    def local_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shadow.values())

    def describe(self) -> str:
        lay = self.layout
        held = ", ".join(x for x in (f"TP shards of {lay.tp}" if lay.tp > 1 else "",
                                     f"pipeline stage {lay.pp_rank} of {lay.pp}" if lay.pp > 1 else "") if x)
        what = f"{len(self.shadow)} trainable tensors" + (f" ({held})" if held else "")
        if self.dp == 1:
            return f"decay {self.decay}, fp32, {what}, whole on each rank (dp 1)"
        where = "its ZeRO-3 partitions (ds_tensor)" if self.zero_stage == 3 else \
            "a slice of the whole parameters it holds, cut like ZeRO-3 partitions"
        return f"decay {self.decay}, fp32, {what}; each of the {self.dp} data-parallel ranks keeps 1/{self.dp}: {where}"

    # ---- the EMA in place of the weights (held-out evaluation) -------------------------
    @torch.no_grad()
    def swap_in(self) -> dict[str, torch.Tensor]:
        """Collective over DP: the module's trainable parameters := the EMA (in their dtype).
        Returns this rank's 1/dp slice of the live values: all `restore` needs, since the other
        slices are held by the other data-parallel ranks (no full copy of the weights is kept)."""
        backup = {n: self._local(n).clone() for n in self.params}
        for n in self.params:
            self._write(n, self.shadow[n])
        return backup

    @torch.no_grad()
    def restore(self, backup: dict[str, torch.Tensor]) -> None:
        """Collective over DP: the live values back, bit for bit (undoes `swap_in`)."""
        for n in self.params:
            self._write(n, backup[n])

    def _write(self, n: str, values: torch.Tensor) -> None:
        """This rank's slice of parameter `n` := values, and every whole copy of it rebuilt from
        the DP ranks' slices: under ZeRO 0-2 the rank's parameter; under ZeRO-3 the partition,
        plus p.data where it holds the whole tensor (a persistent parameter, kept gathered)."""
        p = self.params[n]
        numel = self.shapes[n].numel()
        if self.zero_stage == 3:
            self._local(n).copy_(values)
            if p.data.numel() != numel:
                return  # gathered from the partitions at the next forward
        size, _, valid = self.bounds[n]
        if self.dp == 1:
            flat = values
        else:
            padded = torch.zeros(size, dtype=values.dtype, device=p.device)
            padded[:valid].copy_(values)
            parts = [torch.empty_like(padded) for _ in range(self.dp)]
            dist.all_gather(parts, padded, group=self.layout.dp_group())
            flat = torch.cat(parts)
        p.data.view(-1).copy_(flat[:numel])

    # ---- same-layout checkpoints -------------------------------------------------------
    def _layout_key(self) -> dict:
        lay = self.layout
        return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": self.zero_stage,
                "tp_rank": lay.tp_rank, "pp_rank": lay.pp_rank, "dp_rank": lay.dp_rank}

    def _file(self, root: str, tag: str) -> str:
        lay = self.layout
        return os.path.join(root, tag, f"ema_pp{lay.pp_rank}_tp{lay.tp_rank}_dp{lay.dp_rank}.pt")

    def state_dict(self) -> dict:
        return {"decay": self.decay, "layout": self._layout_key(),
                "shadow": {n: t.detach().cpu() for n, t in self.shadow.items()}}

    def save(self, root: str, tag: str) -> str | None:
        """This rank's file (tmp + rename) in <root>/<tag>/; call before the engine's
        save_checkpoint (which writes `latest` last). Not collective."""
        from ..train.checkpoint import atomic_save

        return str(atomic_save(self.state_dict(), self._file(root, tag)))

    @torch.no_grad()
    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        saved, mine = state.get("layout", {}), self._layout_key()
        if any(saved.get(k) != mine[k] for k in ("tp", "pp", "dp", "tp_rank", "pp_rank", "dp_rank")):
            raise ValueError(f"{source}: EMA saved under layout {saved}, resuming under {mine}: the per-rank EMA "
                             "is layout-bound; resume under the saving layout, or go through --save-full / "
                             "--resume-full (layout-free, EMA included)")
        from ..optim.builder import copy_shadow

        copy_shadow(self.shadow, state["shadow"], source, "this rank's trainable parameters")
        # the decay stays this run's optim.ema_decay (as with --resume-full and iomm-train)

    def load(self, root: str, tag: str) -> bool:
        """Restore this rank's EMA from <root>/<tag>/. True if restored; False if the checkpoint
        holds no EMA at all (saved without one: the EMA restarts from the loaded weights)."""
        path = self._file(root, tag)
        if not os.path.isfile(path):
            if glob.glob(os.path.join(root, tag, "ema_pp*_tp*_dp*.pt")):
                raise FileNotFoundError(f"{path} missing while the checkpoint holds other ranks' EMA files: resume "
                                        "under the layout that saved it, or use --save-full / --resume-full")
            self.reset()
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), source=path)
        return True

    # ---- full (single-device) tensors: layout-free checkpoints and export ---------------
    @torch.no_grad()
    def full(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """{name: full single-device fp32 EMA (cpu)} for this rank's stage; collective over the
        DP group (the slices) and the TP group (the shards), like reshard.full_state."""
        from .reshard import _tp_gather, _tp_info

        lay = self.layout
        specs = _tp_info(module)
        tp_group = lay.tp_group() if lay.tp > 1 else None
        dp_group = lay.dp_group() if self.dp > 1 else None
        out = {}
        for n in self.params:
            s = self.shadow[n]
            size, _, valid = self.bounds[n]
            if self.dp > 1:
                padded = torch.zeros(size, dtype=torch.float32, device=s.device)
                padded[:valid].copy_(s)
                parts = [torch.empty_like(padded) for _ in range(self.dp)]
                dist.all_gather(parts, padded, group=dp_group)
                flat = torch.cat(parts)
            else:
                flat = s
            local = flat[: self.shapes[n].numel()].reshape(self.shapes[n])
            out[n] = _tp_gather(local.cpu(), specs.get(n), tp_group, lay.tp).clone()
        return out

    @torch.no_grad()
    def load_full(self, module: nn.Module, full: dict[str, torch.Tensor], source: str = "") -> None:
        """Full single-device EMA tensors, cut for this rank: its TP shard, then its DP slice."""
        from .reshard import _local, _tp_info

        missing = [n for n in self.params if n not in full]
        if missing:
            raise KeyError(f"layout-free checkpoint {source} lacks the EMA of {len(missing)} trainable "
                           f"parameters, e.g. {missing[:3]}")
        specs = _tp_info(module)
        for n in self.params:
            flat = _local(module, n, full[n], specs).float().reshape(-1)
            if flat.numel() != self.shapes[n].numel():
                raise ValueError(f"layout-free checkpoint {source}: EMA of {n} has {flat.numel()} elements for this "
                                 f"rank's shard, expected {self.shapes[n].numel()}")
            _, start, valid = self.bounds[n]
            self.shadow[n].copy_(flat.narrow(0, min(start, flat.numel()), valid))


def export_ema(rt, out_dir: str | os.PathLike, config: dict | None = None) -> str | None:
    """Collective. Rank 0 writes <out_dir>/ema.safetensors (the full EMA under single-process
    names) and <out_dir>/state.pt (single-process checkpoint format: "model" = the live weights,
    "ema" = {"decay", "shadow"}; frozen parts are not in it, they come from their source) for
    `iomm-sample --checkpoint out_dir` and `train.init_from`. Pipeline stages' leaders hand
    their parts over through temporary files. Returns out_dir on rank 0, else None."""
    from .reshard import full_state

    if rt.ema is None:
        raise RuntimeError("export_ema: this run keeps no EMA (optim.ema_decay is null)")
    out = Path(out_dir)
    lay = rt.layout
    ema = rt.ema.full(rt.module)
    live = full_state(rt, with_moments=False, with_ema=False)["params"]
    leader = lay.tp_rank == 0 and lay.dp_rank == 0
    if leader:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if leader and lay.pp_rank > 0:
        torch.save({"ema": ema, "model": live}, out / f".part_pp{lay.pp_rank}.pt")
    dist.barrier()
    path = None
    if dist.get_rank() == 0:
        for part in sorted(out.glob(".part_pp*.pt")):
            data = torch.load(part, map_location="cpu", weights_only=True)
            ema.update(data["ema"])
            live.update(data["model"])
            part.unlink()
        from safetensors.torch import save_file

        tensors = {n: t.contiguous() for n, t in ema.items()}
        save_file(tensors, str(out / "ema.safetensors.tmp"), metadata={"decay": str(rt.ema.decay),
                                                                       "step": str(rt.step)})
        os.replace(out / "ema.safetensors.tmp", out / "ema.safetensors")
        state = {"step": rt.step, "model": live, "ema": {"decay": rt.ema.decay, "shadow": ema}, "frozen": {},
                 "config": config, "source": "DistributedTrainer EMA export",
                 "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": rt.ema.zero_stage}}
        from ..train.checkpoint import atomic_save

        atomic_save(state, out / "state.pt")
        path = str(out)
    dist.barrier()
    return path
