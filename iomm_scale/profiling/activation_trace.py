"""What autograd saves for backward, measured from the model itself: one IOMM forward on the
meta device (real modules, real shapes, no memory), with torch.autograd.graph.saved_tensors_hooks
counting the bytes of every distinct storage saved, per unit (conditioner RQA / frozen LLM
layers / projection, generator prologue, each block, head, loss). The memory planner
(profiling/memory.py) builds its activation terms from these traces.

Attention counts what the fused kernels keep (q, k, v, out, log-sum-exp); compiled blocks are
traced through inductor's decompositions and partitioner (`compile` on / all).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..train.compile import COMPILE_MODES

if TYPE_CHECKING:
    from .memory import _Structure


# ------------------------------------------------------------------------------------------
# activations: the real forward on the meta device, saved tensors counted per unit
# ------------------------------------------------------------------------------------------
# What fused attention kernels (flash / memory-efficient / CPU flash) keep for backward: q, k,
# v, the output and the fp32 log-sum-exp; never the S x S scores. A custom op (not an
# autograd.Function) so that torch.compile's partitioner sees one opaque node whose backward
# needs exactly those five tensors, as it does for the real kernels.
@torch.library.custom_op("iomm_plan::flash_like_attention", mutates_args=())
def _flash_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=torch.float32)


@_flash_like.register_fake
def _(q, k, v):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("iomm_plan::flash_like_attention_backward", mutates_args=())
def _flash_like_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # pragma: no cover - never run


@_flash_like_backward.register_fake
def _(grad, q, k, v, out, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_like_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _flash_like_grad(ctx, grad, grad_lse):  # pragma: no cover - the planner never runs backward
    return _flash_like_backward(grad, *ctx.saved_tensors)


_flash_like.register_autograd(_flash_like_grad, setup_context=_flash_like_setup)


@contextlib.contextmanager
def _flash_like_sdpa():
    """F.scaled_dot_product_attention on meta tensors -> _flash_like, for eager and compiled
    tracing alike (dynamo traces into the replacement; a TorchFunctionMode it cannot trace).
    The model files and transformers look the function up on torch.nn.functional per call."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        if not query.is_meta:
            return original(query, key, value, *args, **kwargs)
        return _flash_like(query, key, value)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class _MetaScalars(torch.utils._python_dispatch.TorchDispatchMode):
    """Data-dependent reads on meta tensors (e.g. `mask.all()` before choosing a kernel)
    answer "true / 1": every token is real, nothing is padded."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return True if args[0].dtype == torch.bool else 1
        return func(*args, **(kwargs or {}))


class _SavedTracker:
    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.owner: dict[int, str] = {}
        self.bytes: dict[str, float] = {}
        self.largest: dict[str, float] = {}
        self.unit = "outside"

    def pack(self, t: torch.Tensor):
        try:
            key = t.untyped_storage()._cdata
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrapper subclasses)
            return t
        if key in self.exclude or key in self.owner:
            return t.detach()
        self.owner[key] = self.unit
        self.bytes[self.unit] = self.bytes.get(self.unit, 0.0) + nbytes
        self.largest[self.unit] = max(self.largest.get(self.unit, 0.0), nbytes)
        return t.detach()  # not t itself: a saved output would close an uncollectable cycle (profile.count_saved)

    @contextlib.contextmanager
    def as_unit(self, name: str):
        previous, self.unit = self.unit, name
        try:
            yield
        finally:
            self.unit = previous


def _storage_keys(*modules) -> set[int]:
    keys = set()
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            keys.add(t.untyped_storage()._cdata)
    return keys


@dataclass
class ActivationTrace:
    units: dict[str, float]  # unit -> bytes first saved there
    largest: dict[str, float]  # unit -> largest single saved storage
    block_boundary: list[float]  # bytes of each block's residual-stream input (what a checkpoint keeps)
    shared: float  # state tensors every block reads (temb, RoPE tables, masks): alive all along
    mllm_boundary: float  # the LLM's input embeddings (what checkpointing the MLLM keeps)

    @property
    def blocks(self) -> list[float]:
        return [self.units.get(f"block{i}", 0.0) for i in range(len(self.block_boundary))]

    @property
    def mllm_layers(self) -> list[float]:
        return [v for k, v in self.units.items() if k.startswith("mllm.L")]

    @property
    def mllm_total(self) -> float:
        return self.units.get("mllm", 0.0) + sum(self.mllm_layers)

    def mllm_kept(self, mode) -> float:
        """What the frozen LLM keeps until its backward: everything (False / "none"), its input
        embeddings ("whole": one checkpoint around the LLM, a what-if), or each decoder layer's
        input (True / "layers": what parallel/checkpointing.py does)."""
        if mode in (False, None, "none"):
            return self.mllm_total
        if mode == "whole":
            return self.mllm_boundary
        if mode in (True, "layers"):
            return self.units.get("mllm", 0.0) + self.mllm_boundary * max(1, len(self.mllm_layers))
        raise ValueError(f"checkpoint_mllm must be false, true / 'whole' or 'layers', got {mode!r}")

    def mllm_recompute(self, mode) -> float:
        """Activations alive at once during the LLM's backward."""
        if mode in (True, "layers"):
            return self.mllm_kept(mode) + max(self.mllm_layers, default=0.0)
        return self.mllm_total


def _tensor_bytes(t) -> float:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0.0


@contextlib.contextmanager
def _compiled_for_trace(modules: list[nn.Module]):
    """Run each module's forward through torch.compile while tracing, as train.compile runs
    it (static shapes, one graph per block), with inductor's decompositions and partitioner
    but no code generation (backend aot_eager_decomp_partition: it executes the partitioned
    forward graph eagerly, here on the meta device)."""
    import torch._dynamo

    def compiled_forward(module):
        fn = torch.compile(module.forward, backend="aot_eager_decomp_partition", dynamic=False, fullgraph=True)

        def forward(*args, **kwargs):
            # dynamo does not trace under a dispatch mode (_MetaScalars): off for the block's ops
            with torch.utils._python_dispatch._disable_current_modes():
                return fn(*args, **kwargs)
        return forward

    before = [(m, m.__dict__.get("forward")) for m in modules]
    torch._dynamo.reset()
    try:
        for m in modules:
            m.forward = compiled_forward(m)
        # identical blocks share a graph; distinct shapes (double / single / refiner blocks) each add one
        with torch._dynamo.config.patch(cache_size_limit=max(64, len(modules)),
                                        accumulated_cache_size_limit=max(256, 4 * len(modules))):
            yield
    finally:
        for m, fwd in before:
            if fwd is None:
                del m.forward
            else:
                m.forward = fwd
        torch._dynamo.reset()


def trace_activations(cfg, st: _Structure, batch: int, resolution, dtype: torch.dtype, mllm_dtype: torch.dtype,
                      mllm_len: int | None = None, compile: str = "off") -> ActivationTrace:
    """Run one IOMM forward on the meta device (conditioner chain + generator through its
    pipeline adapter, one block at a time) and count what autograd saves for backward.
    `compile` on / all: the generator blocks (/ and the frozen LLM's decoder layers) run
    compiled (see _compiled_for_trace)."""
    from ..parallel.pipeline import get_adapter
    from .flops import condition_lengths, latent_hw

    lens = condition_lengths(cfg, mllm_len)
    q = cfg.model.conditioner.rqa.num_queries
    gen_cfg = cfg.generator
    h, w = latent_hw(cfg, resolution)
    tracker = _SavedTracker(_storage_keys(st.generator, st.rqa, st.proj, st.mllm))
    adapter = get_adapter(st.generator)
    boundary, shared = [], 0.0
    meta = dict(device="meta")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    compiled = list(st.blocks) if compile != "off" else []
    if compile == "all" and st.mllm is not None:
        compiled += list(getattr(st.mllm.model.language_model, "layers", []))
    with _compiled_for_trace(compiled), _flash_like_sdpa(), _MetaScalars(), \
            torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
        context = torch.empty(batch, lens["context"], st.rqa.queries.shape[-1], dtype=mllm_dtype, **meta)
        with tracker.as_unit("rqa"):
            queries = st.rqa(context.to(dtype)).to(mllm_dtype)
        mllm_boundary = 0.0
        if st.mllm is not None:
            lm = st.mllm.model.language_model
            hooks = []
            for i, layer in enumerate(getattr(lm, "layers", [])):  # per decoder layer: "mllm.L<i>"
                hooks.append(layer.register_forward_pre_hook(
                    lambda m, a, i=i: setattr(tracker, "unit", f"mllm.L{i}")))
                hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(tracker, "unit", "mllm")))
            try:
                with tracker.as_unit("mllm"):
                    full = torch.cat([context, queries], 1)
                    mllm_boundary = _tensor_bytes(full)
                    pos = torch.arange(full.shape[1], **meta)[None].expand(batch, -1)
                    hidden = lm(inputs_embeds=full, position_ids=pos, use_cache=False).last_hidden_state
            finally:
                for hk in hooks:
                    hk.remove()
        else:
            hidden = torch.cat([context, queries], 1)
        with tracker.as_unit("projection"):
            tokens = hidden[:, -q:] if cfg.model.conditioner.condition_positions == "queries" else hidden
            cond = st.proj(tokens.to(dtype))
        latents = torch.empty(batch, gen_cfg.latent_channels, h, w, dtype=dtype, **meta)
        t = torch.empty(batch, dtype=dtype, **meta)
        with tracker.as_unit("prologue"):
            state = tuple(adapter.embed(st.generator, latents, t, cond, None))
        for i in range(len(st.blocks)):
            ins = {id(x): x for x in state if isinstance(x, torch.Tensor)}
            with tracker.as_unit(f"block{i}"):
                new = tuple(adapter.run_blocks(st.generator, i, i + 1, state))
            changed = [x for x in state if isinstance(x, torch.Tensor) and not any(x is y for y in new)]
            if i == 0:
                shared = sum(_tensor_bytes(x) for k, x in ins.items() if not any(x is c for c in changed))
            boundary.append(sum(_tensor_bytes(x) for x in changed))
            state = new
        with tracker.as_unit("head"):
            pred = adapter.head(st.generator, state)
        with tracker.as_unit("loss"):
            F.mse_loss(pred.float(), torch.empty(pred.shape, dtype=torch.float32, **meta))
    return ActivationTrace(tracker.bytes, tracker.largest, boundary, shared, mllm_boundary)


def _lerp(a: float, b: float, mb: int) -> float:
    """Value at micro-batch `mb` of the line through (1, a) and (2, b)."""
    return a + (b - a) * (mb - 1)


def extrapolate(t1: ActivationTrace, t2: ActivationTrace, mb: int) -> ActivationTrace:
    """Every activation autograd saves is either proportional to the micro-batch or
    independent of it (RoPE tables), so the traces at micro-batch 1 and 2 give any other
    exactly (tests/profiling checks it against a direct trace)."""
    keys = set(t1.units) | set(t2.units)
    return ActivationTrace(
        {k: _lerp(t1.units.get(k, 0.0), t2.units.get(k, 0.0), mb) for k in keys},
        {k: _lerp(t1.largest.get(k, 0.0), t2.largest.get(k, 0.0), mb) for k in set(t1.largest) | set(t2.largest)},
        [_lerp(a, b, mb) for a, b in zip(t1.block_boundary, t2.block_boundary)],
        _lerp(t1.shared, t2.shared, mb), _lerp(t1.mllm_boundary, t2.mllm_boundary, mb))


def _trace_for(cache, cfg, st, lay, lora_rank, dtype, mllm_dtype, res, mllm_len) -> ActivationTrace:
    def at(mb):
        key = ("trace", lay.tp, lora_rank, dtype, mllm_dtype, mb, str(res), mllm_len, lay.compile)
        if key not in cache:
            cache[key] = trace_activations(cfg, st, mb, res, dtype, mllm_dtype, mllm_len, lay.compile)
        return cache[key]

    if lay.micro_batch <= 2:
        return at(lay.micro_batch)
    return extrapolate(at(1), at(2), lay.micro_batch)
