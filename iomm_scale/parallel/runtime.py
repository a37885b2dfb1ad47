"""One object that runs a model under a parallel layout: `ParallelRuntime`.

    rt = ParallelRuntime.build(model, pcfg, optimizer_fn, micro_batch=..., grad_clip=...)
    out = rt.train_step(batch)        # batch: this data-parallel rank's samples (dict)
    rt.save(dir, tag) / rt.load(dir, tag)                 # DeepSpeed engine checkpoints
    rt.save_full(dir) / ParallelRuntime.build(..., resume_full=dir)   # any layout -> any
    ParallelRuntime.build(..., ema_decay=0.999)   # rt.ema: fp32 EMA per rank (parallel/ema.py),
                                                  # updated after each step, in every checkpoint

`build` applies, in order: tensor parallelism to the generator (megatron layers), the
pipeline split (stage module), activation checkpointing, then the DeepSpeed engine
(ZeRO over megatron's DP group) and, with pp > 1, the 1F1B schedule.

Randomness inside the loss (timesteps, noise, MIM masks, condition dropout) is seeded per
(seed, step, data-parallel rank, micro-batch): every TP rank and pipeline stage of one
replica draws the same numbers, and a single-process run that walks the same slices in
the same order reproduces the run exactly (that is how the parity tests compare).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..train.nonfinite import poison_nonfinite
from .config import ParallelConfig
from .groups import Layout, current_layout


def micro_seed(seed: int, step: int, dp_rank: int, micro: int) -> int:
    """The RNG seed of one micro-batch (noise, timesteps, masks): distinct for every (seed, step,
    data-parallel rank, micro-batch) (a linear mix repeated itself from 100 ranks x 9
    micro-batches on: rank 99's micro-batch 8 drew rank 0's micro-batch 0 of the next step),
    the same on the TP / PP ranks of one replica."""
    return int(np.random.SeedSequence([seed, step, dp_rank, micro]).generate_state(1, np.uint64)[0] % (2**63 - 1))


# --------------------------------------------------------------------------- losses
def generator_prologue(model, batch: dict):
    """For a bare generator: the batch already holds the flow inputs."""
    return batch["x_t"], batch["t"], batch["cond"], batch.get("cond_mask"), batch["target"]


def iomm_prologue(model, batch: dict):
    """IOMMModel.loss up to the generator call: (x_t, t, cond, cond_mask, target)."""
    return model.prepare_generator_inputs(batch)


def default_prologue(model):
    return iomm_prologue if hasattr(model, "conditioner") else generator_prologue


def default_loss_fn(model, batch: dict) -> torch.Tensor:
    if hasattr(model, "loss"):
        return model.loss(batch)
    x_t, t, cond, cond_mask, target = generator_prologue(model, batch)
    return F.mse_loss(model(x_t, t, cond, cond_mask).float(), target.float())


class _Adopt(nn.Module):
    """Registers `model`'s children as its own (state-dict keys unchanged)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        # parameters on the model's root (e.g. S3-DiT's pad tokens): the same objects, same names
        for name, prm in model.named_parameters(recurse=False):
            self.register_parameter(name, prm)
        for name, buf in model.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        object.__setattr__(self, "_model", model)
        # what the root declares for optimizers (Muon's routing: optim/muon.py) and its config:
        # adopted children alone would lose them when the root is a bare generator (its
        # norm_out_mod then went to Muon by the name rules instead of to AdamW)
        for attr in ("non_hidden_modules", "modulation_suffixes", "cfg"):
            if hasattr(model, attr):
                object.__setattr__(self, attr, getattr(model, attr))

    def train(self, mode: bool = True):
        super().train(mode)
        self._model.training = mode
        return self


class LossModule(_Adopt):
    """forward(batch) = loss_fn(model, batch): what the DeepSpeed engine wraps without PP."""

    def __init__(self, model: nn.Module, loss_fn: Callable = default_loss_fn):
        super().__init__(model)
        object.__setattr__(self, "_loss_fn", loss_fn)

    def forward(self, batch: dict, fn: Callable | None = None):
        """loss_fn(model, batch), or fn(model, batch) (held-out evaluation: sample_losses)."""
        return (fn or self._loss_fn)(self._model, batch)


# --------------------------------------------------------------------------- batches
def split_batch(batch: dict, n: int) -> list[dict]:
    """n equal micro-batches along dim 0 (tensors and lists)."""
    size = None
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            size = v.shape[0]
            break
        if isinstance(v, list):
            size = len(v)
            break
    if size is None or size % n:
        raise ValueError(f"batch of {size} samples does not split into {n} micro-batches")
    m = size // n
    out = []
    for i in range(n):
        mb = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size:
                mb[k] = v[i * m:(i + 1) * m]
            elif isinstance(v, list) and len(v) == size:
                mb[k] = v[i * m:(i + 1) * m]
            else:
                mb[k] = v
        out.append(mb)
    return out


def dp_slice(batch: dict, dp: int, dp_rank: int) -> dict:
    """This data-parallel rank's share of a global batch."""
    return split_batch(batch, dp)[dp_rank]


# --------------------------------------------------------------------------- runtime
@dataclass
class ParallelRuntime:
    pcfg: ParallelConfig
    layout: Layout
    model: nn.Module          # the (TP-sharded, PP-pruned) model; shares modules with `module`
    module: nn.Module         # what the engine wraps (LossModule or PipelineStageModule)
    engine: Any
    micro_batch: int
    seed: int = 0
    pipeline: Any = None
    step: int = 0
    info: dict = field(default_factory=dict)
    ema: Any = None           # parallel/ema.DistributedEMA when built with ema_decay

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, pcfg: ParallelConfig, optimizer_fn: Callable, *, micro_batch: int,
              grad_clip: float = 1.0, seed: int = 0, loss_fn: Callable | None = None,
              prologue: Callable | None = None,
              ds_extra: dict | None = None, persistence_threshold: int | None = None,
              resume_full: str | None = None, layout: Layout | None = None,
              ema_decay: float | None = None, compile_backend: str | None = None,
              compile_mllm: bool = False) -> "ParallelRuntime":
        """`model`: an IOMMModel (with .generator) or a bare generator, built whole (or built
        sharded with `tensor_parallel.tp_linear_factory`). `micro_batch`: samples per
        micro-batch per DP rank; pcfg.num_microbatches micro-batches make one step (any batch
        dict: tensors, captions; under pp > 1 too). `ema_decay`: keep an fp32 EMA of the trainable parameters (`rt.ema`,
        parallel/ema.py; restored from `resume_full` when the checkpoint has one).
        `compile_backend`: torch.compile each generator block with it (train/compile.py; any
        layout but ZeRO-3), and with `compile_mllm` each frozen LLM decoder layer."""
        from . import checkpointing
        from .deepspeed_engine import assert_unmanaged_accumulation, deepspeed_config, initialize_engine
        from .tensor_parallel import apply_tensor_parallel, is_tp_layer

        layout = layout or current_layout()
        gen = getattr(model, "generator", model)
        info: dict = {}
        if layout.tp > 1 and not any(is_tp_layer(m) for m in gen.modules()):
            apply_tensor_parallel(gen)
            info["tp_partial_grad"] = getattr(gen, "_iomm_tp_partial_grad", [])
        pipeline_module = None
        if layout.pp > 1:
            from .pipeline import PipelineStageModule

            prologue = prologue or default_prologue(model)

            def stage0_prologue(m, index):
                # `index`: the micro-batch's number, the only thing the schedule hands over (see
                # train_step); the micro-batches themselves wait on the stage module, whatever they
                # hold (captions, feature arrays): pipelining chunks tensors only. It runs
                # micro-batch 0 twice on its first step (metadata inference), so seeds come from
                # the index, not from a call counter.
                i = int(index[0])
                torch.manual_seed(pipeline_module.seeds(i))
                return prologue(m, pipeline_module.microbatches[i])

            pipeline_module = PipelineStageModule(model, layout.pp_rank, layout.pp, prologue=stage0_prologue)
            pipeline_module.seeds = _Seeds()
            module = pipeline_module
        else:
            module = LossModule(model, loss_fn or default_loss_fn)
        if resume_full is not None:
            from .reshard import load_full_params

            info["resume_full_params"] = load_full_params(module, resume_full)
        info["checkpointing"] = checkpointing.apply_to_model(model, pcfg.activation_checkpointing,
                                                             pcfg.checkpoint_every_k, pcfg.checkpoint_mllm) \
            if layout.pp == 1 else _checkpoint_stage(model, pcfg, pipeline_module)
        if compile_backend is not None:
            from ..train.compile import compile_blocks, compile_frozen_mllm, compile_layout_errors, compile_notes

            errors = compile_layout_errors(layout.tp, layout.pp, pcfg.zero_stage)
            if errors:
                raise ValueError("; ".join(f"{k}: {m}" for k, m in errors))
            info["compile_notes"] = compile_notes(layout.tp, pcfg.activation_checkpointing)
            info["compiled_blocks"] = compile_blocks(gen, compile_backend)
            if compile_mllm and getattr(model, "conditioner", None) is not None:
                info["compiled_mllm_layers"] = compile_frozen_mllm(model.conditioner, compile_backend)
        if layout.pp > 1:
            # The schedule runs the backwards itself (torch-style backward, which DeepSpeed
            # scales by 1 / gradient_accumulation_steps) and our loss already divides by the
            # micro-batch count: DeepSpeed sees one "micro-batch" of the whole per-rank batch.
            ds_micro, ds_accum = micro_batch * pcfg.num_microbatches, 1
        else:
            ds_micro, ds_accum = micro_batch, pcfg.num_microbatches
        ds_cfg = deepspeed_config(pcfg, micro_batch=ds_micro, dp=layout.dp, grad_accum=ds_accum,
                                  grad_clip=grad_clip, persistence_threshold=persistence_threshold, extra=ds_extra)
        engine = initialize_engine(module, optimizer_fn, ds_cfg)
        assert_unmanaged_accumulation(engine)
        if engine.zero_optimization_stage() == 0:
            _guard_zero0_step(engine)
        rt = cls(pcfg=pcfg, layout=layout, model=model, module=module, engine=engine, micro_batch=micro_batch,
                 seed=seed, info=info)
        if layout.pp > 1:
            from .pipeline import Pipeline

            rt.pipeline = Pipeline(engine, pipeline_module, pcfg.num_microbatches, layout.pp_group(),
                                   n_extras=1, target_from_extras=True)
        if resume_full is not None:
            from .reshard import load_full_optimizer

            _refuse_muon_layout_free(engine)
            rt.step = load_full_optimizer(rt, resume_full)
        if ema_decay:
            from .ema import DistributedEMA

            rt.ema = DistributedEMA(module, ema_decay, zero_stage=engine.zero_optimization_stage(), layout=layout)
            if resume_full is not None:
                from .reshard import load_full_ema

                rt.info["ema_restored"] = load_full_ema(rt, resume_full)
        return rt

    # ---- training --------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on this DP rank's `batch` (num_microbatches x micro_batch
        samples). Returns the global mean loss (over DP) and the clipped-before norm."""
        m = self.pcfg.num_microbatches
        self.engine.train()
        if self.pipeline is None:
            total = torch.zeros(())
            for i, mb in enumerate(split_batch(batch, m)):
                torch.manual_seed(micro_seed(self.seed, self.step, self.layout.dp_rank, i))
                loss = self.engine(mb)
                # a NaN / inf loss with finite gradients must not be applied either (train/nonfinite.py)
                self.engine.backward(poison_nonfinite(loss))  # scaled by 1 / num_microbatches inside
                total += loss.detach().float() / m
        else:
            self.module.seeds.reset(self.seed, self.step, self.layout.dp_rank)
            args = ()
            if self.layout.is_first_stage:
                self.module.microbatches = split_batch(batch, m)
                args = (torch.arange(m, dtype=torch.float32),)  # chunked into one index per micro-batch
            total = self.pipeline.step(args)
            self.module.microbatches = None
        self.engine.step()  # skips (applies nothing) when the global gradient norm is not finite
        applied = bool(self.engine.was_step_applied())
        if self.ema is not None and applied:
            self.ema.update()
        loss = total.detach().float().reshape(1).clone()
        if self.layout.dp > 1:
            dist.all_reduce(loss, group=self.layout.dp_group())
            loss /= self.layout.dp
        self.step += 1
        norm = self.engine.get_global_grad_norm()
        return {"step": self.step, "loss": float(loss[0]), "applied": applied,
                "grad_norm": float(norm) if norm is not None else float("nan")}

    @torch.no_grad()
    def sample_grid(self, cfg, device) -> tuple:
        """(references, samples) of train/trainer.sample_grid for an IOMM model (mid-run sample
        grids), in eval mode: every rank calls it, and every rank of the first pipeline stage
        gets them (other stages: (None, None)). Each data-parallel replica samples its share of
        the rows (trainer.grid_rows), gathered over the replicas afterwards: ceil(n / dp) rows
        per replica instead of n, and the grid equals one process's. Through the engine (TP
        collectives, ZeRO-3's parameter gathering: each rank makes the same module calls, padded
        shares included), or under pp > 1 stage by stage (PipelineStageModule.sample_grid)."""
        from ..train.trainer import sample_grid

        lay = self.layout
        part = (lay.dp_rank, lay.dp) if lay.dp > 1 else None
        self.engine.eval()
        try:
            if self.pipeline is not None:
                refs, images = self.module.sample_grid(cfg, device, lay.pp_group(), part)
            else:
                refs, images = self.engine(None, fn=lambda model, _: sample_grid(model, cfg, device, part=part))
        finally:
            self.engine.train()
        if images is not None and part is not None:  # a first stage's replicas: all of them hold a share
            shares = [torch.empty_like(images) for _ in range(lay.dp)]
            dist.all_gather(shares, images.contiguous(), group=lay.dp_group())
            images = torch.cat(shares)[: refs.shape[0]]
        return refs, images

    @torch.no_grad()
    def sample_losses(self, batch: dict, draws) -> torch.Tensor:
        """Per-sample losses [B] of an IOMM model on `batch` under fixed `draws` (held-out
        evaluation, train/evaluate.py): every rank of the replica calls it. Through the engine
        (TP collectives, ZeRO-3's parameter gathering), or under pp > 1 stage by stage, forward
        only (PipelineStageModule.sample_losses; pipelines run at ZeRO 0/1: whole weights)."""
        self.engine.eval()
        try:
            if self.pipeline is not None:
                return self.module.sample_losses(batch, draws, self.layout.pp_group())
            return self.engine(batch, fn=lambda model, b: model.sample_losses(b, draws))
        finally:
            self.engine.train()

    # ---- DeepSpeed engine checkpoints (same layout) ----------------------------------
    # Our Muon at ZeRO-0 keeps each matrix's momentum on its data-parallel owner only, while
    # DeepSpeed's ZeRO-0 checkpoint holds the optimizer state of DP rank 0: every rank also
    # writes its own Muon state beside it, and loads it back after DeepSpeed's load.
    def _muon_state_path(self, root: str, tag: str) -> str:
        lay = self.layout
        return os.path.join(root, tag, f"muon_state_pp{lay.pp_rank}_tp{lay.tp_rank}_dp{lay.dp_rank}.pt")

    def save(self, save_dir: str, tag: str | None = None, client_state: dict | None = None) -> None:
        from ..train.checkpoint import atomic_save

        tag = tag or f"step_{self.step}"
        # our per-rank files first: the engine's save writes `latest` last, so `latest` never
        # names a tag that lacks them
        if self.ema is not None:
            self.ema.save(save_dir, tag)
        muon = our_muon(self.engine)
        if muon is not None and self.layout.dp > 1:
            atomic_save({"dp": self.layout.dp, "state": muon.state_dict()}, self._muon_state_path(save_dir, tag))
        dist.barrier()
        self.engine.save_checkpoint(save_dir, tag=tag, client_state={"iomm_step": self.step, **(client_state or {})})

    def load(self, load_dir: str, tag: str | None = None) -> dict:
        _, client = self.engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True)
        client = client or {}
        self.step = int(client.get("iomm_step", self.step))
        muon = our_muon(self.engine)
        if muon is not None and self.layout.dp > 1:
            if tag is None:
                with open(os.path.join(load_dir, "latest")) as f:
                    tag = f.read().strip()
            path = self._muon_state_path(load_dir, tag)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} missing: this rank's Muon momenta (each matrix's momentum lives on "
                                        "its data-parallel owner; resume with the layout that saved the checkpoint)")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["dp"] != self.layout.dp:
                raise ValueError(f"{path}: saved with data-parallel size {saved['dp']}, resuming with "
                                 f"{self.layout.dp}: Muon ownership (and so the momenta) differ; use the same layout")
            muon.load_state_dict(saved["state"])
        if self.ema is not None:
            if tag is None:
                with open(os.path.join(load_dir, "latest")) as f:
                    tag = f.read().strip()
            self.info["ema_restored"] = self.ema.load(load_dir, tag)
        return client

    # ---- layout-free checkpoints (any layout -> any layout) ------------------------------
    def save_full(self, save_dir: str) -> None:
        from .reshard import save_full

        _refuse_muon_layout_free(self.engine)
        save_full(self, save_dir)


def _guard_zero0_step(engine) -> None:
    """DeepSpeed's fp32 ZeRO-0 step (the only ZeRO stage our Muon runs at) clips with
    `clip_grad_norm_(mpu=...)` (global over TP and PP, shards counted once) but drops the norm it
    computed, so `get_global_grad_norm()` stays None, and applies whatever the gradients hold,
    NaN included. Keep the norm (the logs' grad_norm) and skip an optimizer step whose norm is
    not finite: DeepSpeed reads `optimizer.overflow`, then counts the step as not applied and
    clears the gradients (train/nonfinite.py). Its own bf16 / fp16 wrappers (`fp16_groups`)
    compute the norm and skip by themselves."""
    from deepspeed.runtime.utils import clip_grad_norm_

    if hasattr(engine.optimizer, "fp16_groups"):
        return
    clipping = engine.gradient_clipping() > 0

    def clip_and_record():
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_and_record  # called right before the optimizer step when clipping
    optimizer, inner_step = engine.optimizer, engine.optimizer.step

    def guarded_step(*args, **kwargs):
        if not clipping:  # DeepSpeed computes no norm at all: measure it (an infinite bound scales nothing)
            engine._global_grad_norm = float(clip_grad_norm_(parameters=engine.module.parameters(),
                                                             max_norm=float("inf"), mpu=engine.mpu))
        optimizer.overflow = not math.isfinite(engine._global_grad_norm)
        if optimizer.overflow:
            return None
        return inner_step(*args, **kwargs)

    optimizer.step = guarded_step


def our_muon(engine):
    """The engine's optimizer if it is our `MuonWithAdamW` / `DistributedMuon` (at ZeRO-0 it is
    DeepSpeed's client optimizer itself, or inside a precision wrapper), else None."""
    from ..optim.muon import MuonWithAdamW

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    return inner if isinstance(inner, MuonWithAdamW) else None


def _refuse_muon_layout_free(engine) -> None:
    """DeepSpeed's own Muon keeps its momenta in ZeRO partitions under its own keys: layout-free
    checkpoints carry our Muon's momenta and Adam moments only."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    if type(inner).__name__ == "MuonWithAuxAdam":
        raise NotImplementedError("layout-free checkpoints (save_full / resume_full) carry our Muon's momenta "
                                  "(optim.muon.implementation: iomm) and Adam moments, not DeepSpeed's Muon state; "
                                  "use the DeepSpeed engine checkpoints (same layout)")


class _Seeds:
    """Per-micro-batch seeds for the first pipeline stage."""

    def __init__(self):
        self.seed = self.step = self.dp_rank = 0

    def reset(self, seed, step, dp_rank):
        self.seed, self.step, self.dp_rank = seed, step, dp_rank

    def __call__(self, micro: int) -> int:
        return micro_seed(self.seed, self.step, self.dp_rank, micro)


def _checkpoint_stage(model, pcfg: ParallelConfig, stage) -> dict:
    from . import checkpointing

    gen = getattr(model, "generator", model)
    blocks = gen.blocks()[stage.lo:stage.hi]
    done = {"blocks": [stage.lo + i for i in checkpointing.apply_activation_checkpointing(
        gen, pcfg.activation_checkpointing, pcfg.checkpoint_every_k, blocks=blocks,
        includes_last=stage.last)], "mllm": False}
    if pcfg.checkpoint_mllm and stage.first:
        mllm = checkpointing.find_mllm(model)
        if mllm is not None:
            checkpointing.checkpoint_module(mllm)
            done["mllm"] = True
    return done
