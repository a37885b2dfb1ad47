"""The `parallel` section of the run config, and layout validation.

Everything here is checked before any process group exists, so a bad layout is a clear
error naming the config key, not a hang or a shape mismatch inside a collective.

    tp                        tensor-parallel size (megatron-core Column/RowParallelLinear)
    pp                        pipeline stages (torch.distributed.pipelining, Schedule1F1B)
    zero_stage                DeepSpeed ZeRO stage 0-3 over the data-parallel group
    offload_optimizer         ZeRO optimizer state on CPU (stage >= 1)
    offload_params            ZeRO-3 parameters on CPU (stage 3)
    activation_checkpointing  "none" | "full" (every block) | "every_k" (every k-th block);
                              never the model's last block (parallel/checkpointing.py says why)
    checkpoint_every_k        k for "every_k"
    checkpoint_mllm           recompute the frozen MLLM forward in backward instead of
                              keeping its activations (only matters when gradients flow
                              through it, i.e. into the RQA)
    num_microbatches          micro-batches per optimizer step and data-parallel rank;
                              with pp > 1 these are the 1F1B micro-batches (>= pp)

Data parallelism is what is left: dp = world_size / (tp * pp).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

CHECKPOINTING_MODES = ("none", "full", "every_k")


class LayoutError(ValueError):
    """A parallel layout that cannot run; `errors` is a list of (config key, message)."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = list(errors)
        lines = "\n".join(f"  {key}: {msg}" for key, msg in self.errors)
        super().__init__(f"invalid parallel layout:\n{lines}")


@dataclass
class ModelInfo:
    """What layout validation needs to know about the generator (see `model_info`).

    num_heads        attention heads per block (every head must live whole on one TP rank)
    num_blocks       transformer blocks in `blocks()` order (pipeline stages split these)
    sharded_widths   name -> the widths TP splits for each tagged linear ("column": its
                     output segments, "row": its input segments); every one must divide by tp
    """

    num_heads: int | None = None
    num_blocks: int | None = None
    num_kv_heads: int | None = None
    sharded_widths: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _cfg_int(cfg: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def model_info(model_or_cfg: Any) -> ModelInfo:
    """Introspect a generator (a built module, possibly on the meta device) or its config.

    With a module: heads from `model.cfg`, blocks from `model.blocks()`, and the widths of
    every linear tagged `tp_style` column/row (with `tp_fused_sizes` segments). Build the
    model under `torch.device("meta")` to validate a 20B layout without allocating it.
    """
    import torch.nn as nn

    if isinstance(model_or_cfg, ModelInfo):
        return model_or_cfg
    if isinstance(model_or_cfg, nn.Module):
        model = model_or_cfg
        cfg = getattr(model, "cfg", None)
        info = ModelInfo(
            num_heads=_cfg_int(cfg, "num_heads", "num_attention_heads", "n_heads"),
            num_kv_heads=_cfg_int(cfg, "num_kv_heads", "n_kv_heads", "num_key_value_heads"),
            num_blocks=len(model.blocks()) if hasattr(model, "blocks") else None,
        )
        for name, module in model.named_modules():
            style = getattr(module, "tp_style", None)
            if style not in ("column", "row") or not hasattr(module, "in_features"):
                continue
            full = module.out_features if style == "column" else module.in_features
            info.sharded_widths[name] = tuple(getattr(module, "tp_fused_sizes", None) or (full,))
        return info
    cfg = model_or_cfg
    blocks = None
    layers = [_cfg_int(cfg, n) for n in ("num_layers", "num_single_layers", "n_layers", "n_refiner_layers")]
    if any(v is not None for v in layers):
        blocks = sum(v for v in layers if v is not None)
    return ModelInfo(
        num_heads=_cfg_int(cfg, "num_heads", "num_attention_heads", "n_heads"),
        num_kv_heads=_cfg_int(cfg, "num_kv_heads", "n_kv_heads", "num_key_value_heads"),
        num_blocks=blocks,
    )


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: str = "none"
    checkpoint_every_k: int = 1
    checkpoint_mllm: bool = False
    num_microbatches: int = 1

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)

    def validate(self, world_size: int | None = None, model_info_: Any = None) -> list[tuple[str, str]]:
        """Every problem with this layout as (dotted key under `parallel.`, message)."""
        e: list[tuple[str, str]] = []

        def positive_int(key):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                e.append((key, f"must be an integer >= 1, got {v!r}"))
                return False
            return True

        ok_tp, ok_pp = positive_int("tp"), positive_int("pp")
        positive_int("checkpoint_every_k")
        positive_int("num_microbatches")
        if self.zero_stage not in (0, 1, 2, 3):
            e.append(("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage!r}"))
        if self.activation_checkpointing not in CHECKPOINTING_MODES:
            e.append(("activation_checkpointing", f"must be one of {CHECKPOINTING_MODES}, got {self.activation_checkpointing!r}"))
        if self.offload_params and self.zero_stage != 3:
            e.append(("offload_params", "parameter offload is a ZeRO-3 feature: set zero_stage: 3 or offload_params: false"))
        if self.offload_optimizer and self.zero_stage not in (1, 2, 3):
            e.append(("offload_optimizer", "optimizer offload needs ZeRO (zero_stage 1, 2 or 3)"))
        if ok_pp and self.pp > 1:
            if self.zero_stage in (2, 3):
                e.append(("zero_stage", f"ZeRO-{self.zero_stage} cannot be combined with pipeline parallelism (pp={self.pp}): "
                          "DeepSpeed partitions gradients (ZeRO-2) or parameters (ZeRO-3) with hooks that fire on "
                          "every backward, while a pipeline stage runs many partial backwards per step; "
                          "DeepSpeed itself refuses ZeRO-2/3 with pipelines. Use zero_stage 1 with pp > 1"))
            if self.zero_stage == 0:
                e.append(("zero_stage", f"pipeline parallelism (pp={self.pp}) needs zero_stage 1: the 1F1B schedule runs "
                          "the backward passes itself, and a DeepSpeed engine without ZeRO only accepts "
                          "engine.backward(loss)"))
            if isinstance(self.num_microbatches, int) and self.num_microbatches < self.pp:
                e.append(("num_microbatches", f"1F1B needs at least as many micro-batches as stages: "
                          f"num_microbatches={self.num_microbatches} < pp={self.pp} (use >= {self.pp}, ideally >= 4*pp "
                          "to keep the pipeline bubble small)"))
            if self.offload_params:
                e.append(("offload_params", "parameter offload needs ZeRO-3, which cannot run with pp > 1"))
        if world_size is not None and ok_tp and ok_pp:
            if world_size % (self.tp * self.pp):
                e.append(("tp", f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp} = {self.tp * self.pp}"))
        if model_info_ is not None and ok_tp and ok_pp:
            info = model_info(model_info_)
            if info.num_heads is not None and info.num_heads % self.tp:
                e.append(("tp", f"the generator's {info.num_heads} attention heads are not divisible by tp={self.tp}"))
            if info.num_kv_heads is not None and info.num_kv_heads % self.tp:
                e.append(("tp", f"the generator's {info.num_kv_heads} key/value heads are not divisible by tp={self.tp}"))
            bad = [f"{n} {w}" for n, w in info.sharded_widths.items() if any(s % self.tp for s in w)]
            if bad:
                e.append(("tp", f"tp={self.tp} does not divide the sharded widths of {len(bad)} layer(s), e.g. {bad[0]}"))
            if self.pp > 1 and info.num_blocks is not None:
                if info.num_blocks < self.pp:
                    e.append(("pp", f"pp={self.pp} stages but the generator has only {info.num_blocks} blocks"))
                elif info.num_blocks % self.pp:
                    e.append(("pp", f"the generator's {info.num_blocks} blocks do not split evenly into pp={self.pp} stages"))
        return e

    def validate_or_raise(self, world_size: int | None = None, model_info_: Any = None) -> None:
        errors = self.validate(world_size, model_info_)
        if errors:
            raise LayoutError(errors)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ParallelConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise LayoutError([(k, f"unknown key; known: {sorted(cls.__dataclass_fields__)}") for k in unknown])
        return cls(**d)


def validate_layout(pcfg: ParallelConfig, world_size: int | None = None, model_info_: Any = None) -> None:
    """Raise `LayoutError` listing every problem with `pcfg` for this world size / generator."""
    pcfg.validate_or_raise(world_size, model_info_)


def check_batch(global_batch: int, micro_batch: int, dp: int, key: str = "train.global_batch") -> int:
    """Gradient-accumulation steps for global = micro x dp x accum; a clear error otherwise."""
    if global_batch % (micro_batch * dp):
        raise LayoutError([(key, f"global batch {global_batch} is not divisible by micro_batch x data-parallel size "
                                 f"= {micro_batch} x {dp} = {micro_batch * dp}")])
    return global_batch // (micro_batch * dp)


def describe(pcfg: ParallelConfig, world_size: int) -> str:
    dp = pcfg.data_parallel_size(world_size)
    return (f"world={world_size} = tp {pcfg.tp} x pp {pcfg.pp} x dp {dp}; ZeRO-{pcfg.zero_stage}"
            f"{' +offload(opt)' if pcfg.offload_optimizer else ''}{' +offload(params)' if pcfg.offload_params else ''}; "
            f"checkpointing {pcfg.activation_checkpointing}"
            f"{f' k={pcfg.checkpoint_every_k}' if pcfg.activation_checkpointing == 'every_k' else ''}"
            f"{' +mllm' if pcfg.checkpoint_mllm else ''}; micro-batches {pcfg.num_microbatches}")


def iter_errors(errors: Iterable[tuple[str, str]], prefix: str = "parallel.") -> list[tuple[str, str]]:
    """Prefix keys for the run config's error list."""
    return [(prefix + k, m) for k, m in errors]
