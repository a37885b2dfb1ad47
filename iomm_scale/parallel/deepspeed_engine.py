"""DeepSpeed: the engine users launch and the ZeRO implementation.

`deepspeed_config()` turns our `ParallelConfig` + batch + optimizer settings into
DeepSpeed's JSON config; `initialize_engine()` builds the engine with the megatron mpu
adapter, so ZeRO partitions within megatron's data-parallel group and the gradient norm
is global over TP x PP.

Decisions, each proved by tests/parallel:
- train_batch_size = micro_batch x dp x grad_accum, with dp from the mpu (not world size).
- gradient_clipping is always written (DeepSpeed's default is 1.0, not "off").
- "managed_gradient_accumulation": false. Every `engine.step()` is the accumulation
  boundary; backward only accumulates. This is what lets a torch.distributed.pipelining
  schedule run the backwards (with the default, stage 0 crashes inside `engine.step()`),
  and we use the same mode for every layout so there is one code path.
- Only trainable parameters reach the optimizer: the frozen MLLM / VAE / LoRA base get no
  optimizer state and no gradient, so they are outside clipping too. Under ZeRO-3 they
  are still partitioned (memory) and DeepSpeed writes them as frozen-parameter fragments
  per rank; `load_checkpoint` restores them (DeepSpeed #3090 was this breaking).
- bf16 on CUDA only; CPU runs are fp32.
- On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op (~66 s on
  2 cores, once per machine, in ~/.cache/torch_extensions) even when torch.distributed is
  already initialised: `TorchBackend.__init__` always calls `build_shm_op()`.
  `skip_cpu_shm_build()` marks that op incompatible in DeepSpeed's own op table
  (`deepspeed.ops.__compatible_ops__`, a module-level dict DeepSpeed documents as
  editable) before the backend is created, so gloo does the collectives. CPU only.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn as nn

from .config import ParallelConfig


def skip_cpu_shm_build() -> bool:
    """Stop DeepSpeed from compiling its CPU shm comm op; returns True if it was disabled."""
    if torch.cuda.is_available() or os.environ.get("IOMM_DS_SHM", "") == "1":
        return False
    import deepspeed.ops as ds_ops

    ops = ds_ops.__compatible_ops__
    ops["deepspeed_shm_comm"] = False
    return True


def deepspeed_config(
    pcfg: ParallelConfig,
    *,
    micro_batch: int,
    dp: int,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    bf16: bool | None = None,
    persistence_threshold: int | None = None,
    extra: dict | None = None,
) -> dict:
    """DeepSpeed's config dict. `grad_clip` 0 disables clipping. `persistence_threshold`
    (ZeRO-3 `stage3_param_persistence_threshold`): None keeps DeepSpeed's default; tests use
    0 so that small parameters are really partitioned."""
    if bf16 is None:
        bf16 = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": pcfg.zero_stage}
    if pcfg.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if pcfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if pcfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if pcfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = persistence_threshold
    cfg = {
        "train_batch_size": micro_batch * dp * grad_accum,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "managed_gradient_accumulation": False,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if pcfg.offload_optimizer:
        # the client optimizer may be torch's AdamW rather than DeepSpeedCPUAdam (a compiled op);
        # the dist trainer uses DeepSpeedCPUAdam on GPU hosts when it loads (optimizer_factory)
        cfg["zero_force_ds_cpu_optimizer"] = False
    if extra:
        _deep_update(cfg, extra)
    return cfg


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def initialize_engine(
    module: nn.Module,
    optimizer: torch.optim.Optimizer | Callable[[list], torch.optim.Optimizer],
    ds_config: dict,
    mpu=None,
    lr_scheduler=None,
):
    """`deepspeed.initialize` with the megatron mpu adapter; returns the engine.

    `optimizer` is an optimizer over `trainable_parameters(module)` (param groups allowed),
    a callable building one from a list of parameters / groups, a callable with
    `wants_module = True` building one from the module itself (our Muon routes by name), or
    None when `ds_config` has an "optimizer" entry (DeepSpeed's own, e.g. its Muon).
    """
    import deepspeed

    from .groups import MegatronMPU

    skip_cpu_shm_build()
    if mpu is None:
        mpu = MegatronMPU()
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(module) if getattr(optimizer, "wants_module", False) \
            else optimizer(trainable_parameters(module))
    if optimizer is None and "optimizer" not in ds_config:
        raise ValueError("initialize_engine: no optimizer and no \"optimizer\" entry in the DeepSpeed config")
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config, mpu=mpu, lr_scheduler=lr_scheduler,
        model_parameters=trainable_parameters(module) if optimizer is None else None,
        dist_init_required=False,
    )
    return engine


def assert_unmanaged_accumulation(engine) -> None:
    """Our step code relies on managed_gradient_accumulation=false (see the module doc)."""
    if engine.managed_gradient_accumulation():
        raise RuntimeError("DeepSpeed engine has managed_gradient_accumulation enabled: pipeline stages and our "
                           "micro-batch loop need \"managed_gradient_accumulation\": false")


def zero3_gathered(params, enabled: bool = True):
    """Context manager gathering ZeRO-3 partitioned params (read-only); a no-op otherwise."""
    import contextlib

    params = [p for p in params if hasattr(p, "ds_id")]
    if not enabled or not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def optimized_parameters(engine) -> list:
    """The model parameters the engine's optimizer updates (ZeRO 1/2: bit16_groups, ZeRO-3:
    fp16_groups, no ZeRO: the optimizer's groups). Frozen parameters must never be here."""
    opt = engine.optimizer
    for attr in ("bit16_groups", "fp16_groups"):
        groups = getattr(opt, attr, None)
        if groups:
            return [p for g in groups for p in g]
    inner = getattr(opt, "optimizer", opt)
    return [p for g in inner.param_groups for p in g["params"]]
