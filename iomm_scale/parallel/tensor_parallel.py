"""Tensor parallelism applied from outside the model files.

Model files build every Linear through `models.layers.linear()`, tagged

    tp_style        "column" | "row" | "replicate"
    tp_fused_sizes  the segments of a fused projection along the sharded dimension

This module turns tagged layers into megatron-core ColumnParallelLinear /
RowParallelLinear (use_cpu_initialization=True, gather_output=False for column,
input_is_parallel=True for row), either after the fact (`apply_tensor_parallel`, which
copies each rank's shard out of the full weight) or while the model is built
(`tp_linear_factory` with `use_linear_factory`, so the whole model never exists on one
rank; only one full layer at a time, which also makes a directly sharded build bit-equal
to sharding a full build made from the same seed).

Sharding a fused projection: rank r holds [seg1_r | seg2_r | ...], every segment split on
its own (q|k|v -> [q_r|k_r|v_r]; FLUX's single-block linear1 q|k|v|mlp ->
[q_r|k_r|v_r|mlp_r]; its row-parallel linear2 with input segments (dim, mlp) ->
input columns [attn_r | mlp_r]). `split_fused` in the model code then sees local widths.

The wrapped layers keep the module call `y = layer(x)` (megatron returns (out, bias))
and keep the single-device state-dict names (`weight`, `bias`; megatron's empty
`_extra_state` entry is removed) so a TP shard is just a slice of the plain checkpoint.

Replicated parameters that act on sharded activations get partial gradients: the
per-head q/k RMSNorms after a column-parallel q|k|v see only this rank's heads. Their
gradients are summed over the TP group by a hook (`tp_partial_grad`); they are found as
1-D parameters of width head_dim inside blocks that hold sharded linears, or tagged
`module.tp_partial_grad = True` by a model file.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

_TP_STYLES_SHARDED = ("column", "row")


# --------------------------------------------------------------------------- shard maths
def shard_index(full: int, fused_sizes: Sequence[int] | None, tp: int, rank: int) -> torch.Tensor:
    """Indices along the sharded dim that rank `rank` of `tp` holds."""
    sizes = tuple(fused_sizes) if fused_sizes else (full,)
    if sum(sizes) != full:
        raise ValueError(f"fused sizes {sizes} do not sum to the width {full}")
    parts, offset = [], 0
    for s in sizes:
        if s % tp:
            raise ValueError(f"segment width {s} (of {sizes}) is not divisible by tp={tp}")
        n = s // tp
        parts.append(torch.arange(offset + rank * n, offset + (rank + 1) * n))
        offset += s
    return torch.cat(parts)


def shard_tensor(full: torch.Tensor, dim: int, fused_sizes, tp: int, rank: int) -> torch.Tensor:
    idx = shard_index(full.shape[dim], fused_sizes, tp, rank).to(full.device)
    return full.index_select(dim, idx).contiguous()


def unshard_tensors(shards: Sequence[torch.Tensor], dim: int, fused_sizes) -> torch.Tensor:
    """Inverse of `shard_tensor` over all ranks' shards (in rank order)."""
    tp = len(shards)
    full_width = shards[0].shape[dim] * tp
    sizes = tuple(fused_sizes) if fused_sizes else (full_width,)
    local = [s // tp for s in sizes]
    pieces = [torch.split(sh, local, dim=dim) for sh in shards]  # [rank][segment]
    return torch.cat([torch.cat([pieces[r][i] for r in range(tp)], dim=dim) for i in range(len(sizes))], dim=dim)


# --------------------------------------------------------------------------- layers
def _mp_config(dtype: torch.dtype, tp: int):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=False,  # weights are copied from the full layer
        params_dtype=dtype,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


def _no_init(_w):
    return None


def _clean_megatron_state_dict(layer: nn.Module) -> None:
    # megatron adds a load pre-hook that inserts `_extra_state`; we publish no extra state.
    layer._load_state_dict_pre_hooks.clear()


def _tp_classes():
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        set_tensor_model_parallel_attributes,
    )

    class ColumnLinear(ColumnParallelLinear):
        """megatron ColumnParallelLinear with `y = layer(x)`; output stays sharded."""

        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state
        tp_style = "column"

        def __init__(self, in_features, out_features, bias, fused_sizes, dtype, tp_group):
            tp = dist.get_world_size(tp_group)
            super().__init__(in_features, out_features, config=_mp_config(dtype, tp), init_method=_no_init, bias=bias,
                             gather_output=False, skip_bias_add=False, tp_group=tp_group)
            set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
            _clean_megatron_state_dict(self)
            self.tp_fused_sizes = tuple(fused_sizes) if fused_sizes else None
            self.full_in_features, self.full_out_features = in_features, out_features
            self.in_features, self.out_features = in_features, self.output_size_per_partition

        def forward(self, x):  # noqa: D401
            return super().forward(x)[0]

        def extra_repr(self):
            return f"in={self.full_in_features}, out={self.full_out_features} (local {self.out_features}), fused={self.tp_fused_sizes}"

        __repr__ = nn.Module.__repr__

    class RowLinear(RowParallelLinear):
        """megatron RowParallelLinear with `y = layer(x)`; input is this rank's shard."""

        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state
        tp_style = "row"

        def __init__(self, in_features, out_features, bias, fused_sizes, dtype, tp_group):
            tp = dist.get_world_size(tp_group)
            super().__init__(in_features, out_features, config=_mp_config(dtype, tp), init_method=_no_init, bias=bias,
                             input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
            set_tensor_model_parallel_attributes(self.weight, True, 1, 1)
            _clean_megatron_state_dict(self)
            self.tp_fused_sizes = tuple(fused_sizes) if fused_sizes else None
            self.full_in_features, self.full_out_features = in_features, out_features
            self.in_features, self.out_features = self.input_size_per_partition, out_features

        def forward(self, x):
            return super().forward(x)[0]

        def extra_repr(self):
            return f"in={self.full_in_features} (local {self.in_features}), out={self.full_out_features}, fused={self.tp_fused_sizes}"

        __repr__ = nn.Module.__repr__

    return ColumnLinear, RowLinear


_CLASSES = None


def tp_layer_classes():
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _tp_classes()
    return _CLASSES


def is_tp_layer(module: nn.Module) -> bool:
    return isinstance(module, tp_layer_classes())


def _default_tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def shard_linear(layer: nn.Linear, tp_group=None) -> nn.Module:
    """A megatron TP layer holding this rank's shard of the tagged `nn.Linear` `layer`."""
    style = getattr(layer, "tp_style", "replicate")
    if style not in _TP_STYLES_SHARDED:
        return layer
    tp_group = tp_group if tp_group is not None else _default_tp_group()
    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    fused = getattr(layer, "tp_fused_sizes", None)
    Column, Row = tp_layer_classes()
    cls = Column if style == "column" else Row
    new = cls(layer.in_features, layer.out_features, layer.bias is not None, fused, layer.weight.dtype, tp_group)
    dim = 0 if style == "column" else 1
    with torch.no_grad():
        new.weight.copy_(shard_tensor(layer.weight.detach(), dim, fused, tp, rank))
        if layer.bias is not None:
            b = layer.bias.detach()
            new.bias.copy_(shard_tensor(b, 0, fused, tp, rank) if style == "column" else b)
    new.to(layer.weight.device)
    new.weight.requires_grad_(layer.weight.requires_grad)
    if layer.bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new


def tp_linear_factory(tp_group=None):
    """A factory for `models.layers.use_linear_factory`: builds each tagged layer sharded."""

    def factory(in_features, out_features, bias=True, tp_style="replicate", tp_fused_sizes=None):
        layer = nn.Linear(in_features, out_features, bias=bias)
        layer.tp_style = tp_style
        layer.tp_fused_sizes = tuple(tp_fused_sizes) if tp_fused_sizes else None
        group = tp_group if tp_group is not None else _default_tp_group()
        if tp_style == "replicate" or dist.get_world_size(group) == 1:
            return layer
        return shard_linear(layer, group)

    return factory


# --------------------------------------------------------------------------- whole model
def _head_dim(model: nn.Module) -> int | None:
    cfg = getattr(model, "cfg", None)
    for name in ("head_dim", "attention_head_dim"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def partial_grad_params(model: nn.Module, head_dim: int | None = None) -> list[tuple[str, nn.Parameter]]:
    """Replicated params whose gradient on one TP rank covers only its heads."""
    head_dim = head_dim if head_dim is not None else _head_dim(model)
    blocks = model.blocks() if hasattr(model, "blocks") else [model]
    ids = {id(b) for b in blocks}
    found, seen = [], set()
    for name, module in model.named_modules():
        tagged = getattr(module, "tp_partial_grad", False)
        if not tagged:
            continue
        for pname, p in module.named_parameters(recurse=False):
            found.append((f"{name}.{pname}", p))
            seen.add(id(p))
    for bname, block in model.named_modules():
        if id(block) not in ids:
            continue
        if not any(is_tp_layer(m) or getattr(m, "tp_style", None) in _TP_STYLES_SHARDED for m in block.modules()):
            continue
        for mname, module in block.named_modules():
            if isinstance(module, nn.Linear) or is_tp_layer(module):
                continue
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen or head_dim is None:
                    continue
                if p.dim() == 1 and p.numel() == head_dim:
                    found.append((f"{bname}.{mname}.{pname}".replace("..", "."), p))
                    seen.add(id(p))
    return found


def _allreduce_grad_hook(group):
    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def apply_tensor_parallel(model: nn.Module, tp_group=None, head_dim: int | None = None) -> nn.Module:
    """Replace every column/row-tagged `nn.Linear` in `model` with its megatron TP shard and
    register the TP gradient sum on per-head parameters. In place; returns `model`."""
    tp_group = tp_group if tp_group is not None else _default_tp_group()
    if dist.get_world_size(tp_group) == 1:
        return model
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and getattr(child, "tp_style", "replicate") in _TP_STYLES_SHARDED:
                setattr(parent, child_name, shard_linear(child, tp_group))
    register_partial_grad_hooks(model, tp_group, head_dim)
    return model


def register_partial_grad_hooks(model: nn.Module, tp_group=None, head_dim: int | None = None) -> list[str]:
    tp_group = tp_group if tp_group is not None else _default_tp_group()
    names = []
    if dist.get_world_size(tp_group) == 1:
        return names
    for name, p in partial_grad_params(model, head_dim):
        if getattr(p, "_iomm_tp_hook", False) or not p.requires_grad:
            continue
        p.register_hook(_allreduce_grad_hook(tp_group))
        p._iomm_tp_hook = True
        names.append(name)
    model._iomm_tp_partial_grad = names
    return names
