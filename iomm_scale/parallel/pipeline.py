"""Pipeline parallelism over the generator's `blocks()`.

torch.distributed.pipelining `Schedule1F1B` over megatron's PP group; each stage is one
DeepSpeed engine (ZeRO 0/1; ZeRO-2/3 are rejected by config validation). Stage s owns
blocks [s*n/pp, (s+1)*n/pp) of `generator.blocks()`; the first stage also owns the
generator's input embedders and everything that runs before the generator (the
conditioner: frozen MLLM + RQA + projection), the last stage owns the output head.

What a stage does is family specific in exactly three places, which a
`PipelineAdapter` provides (one per family, registered by class name; or a model may
define `pipeline_embed / pipeline_blocks / pipeline_head` itself):

    embed(gen, latents, t, cond, cond_mask) -> state   the generator before its blocks
    run_blocks(gen, lo, hi, state)           -> state   blocks lo..hi-1
    head(gen, state)                         -> velocity

`state` is a tuple of tensors (what crosses a stage boundary). Tensors that need no
gradient (RoPE tables, masks, shapes) travel too; pipelining sends no gradient for
them. Anything the loss needs on the last stage (the flow target) rides along as
`extras`. The adapters mirror the families' own forward code, and the PP parity tests
prove a pipelined model equal to the single-device one.

Stage modules register the model's own top-level children, with the blocks of other
stages (and the embedders / head they do not own) replaced by empty placeholders, so a
stage's state-dict keys are exactly the full model's keys for the parameters it owns.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.attention import none_if_unpadded
from ..train.nonfinite import poison_nonfinite


# --------------------------------------------------------------------------- adapters
# torch.distributed.pipelining (runtime metadata inference) runs every stage's forward
# once on its first step with *uninitialised* tensors of the right shapes, so nothing may
# be read from tensor values to decide shapes: sizes travel in a tensor's shape (`grid`,
# an [h, w] carrier), never in its values. Masks travel as float (0/1) tensors.
def encode_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.float32)


def decode_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask > 0.5


def grid_carrier(h: int, w: int, device=None) -> torch.Tensor:
    return torch.zeros(h, w, device=device)


class PipelineAdapter:
    """Family-specific pieces of a pipelined generator forward."""

    head_modules: tuple[str, ...] = ()

    def embed(self, gen, latents, t, cond, cond_mask):
        raise NotImplementedError

    def run_blocks(self, gen, lo: int, hi: int, state: tuple):
        raise NotImplementedError

    def head(self, gen, state: tuple):
        raise NotImplementedError


class FluxAdapter(PipelineAdapter):
    """FluxMMDiT: double-stream blocks then single-stream blocks (mirrors forward_tokens)."""

    head_modules = ("norm_out_mod", "proj_out")

    def embed(self, gen, latents, t, cond, cond_mask):
        from iomm_scale.models.attention import rope_angles
        from iomm_scale.models.flux_mmdit import masked_mean, pack_latents
        from iomm_scale.models.layers import timestep_embedding

        cfg = gen.cfg
        tokens, img_ids = pack_latents(latents, cfg.latent_patch)
        txt_ids = torch.zeros(cond.shape[1], 3, device=cond.device)
        img = gen.x_embedder(tokens)
        temb = gen.time_embedder(timestep_embedding(t * 1000).to(img.dtype))
        if gen.guidance_embedder is not None:
            raise ValueError("this model was built with guidance_embeds=True: pass `guidance`")
        temb = temb + gen.pooled_embedder(masked_mean(cond, cond_mask))
        txt = gen.context_embedder(cond)
        cos, sin = rope_angles(torch.cat([txt_ids, img_ids], 0), cfg.axes_dims_rope, cfg.rope_theta)
        if cond_mask is None:
            mask = torch.ones(img.shape[0], txt.shape[1] + img.shape[1], dtype=torch.bool, device=img.device)
        else:
            mask = torch.cat([cond_mask.bool(), cond_mask.new_ones(img.shape[:2], dtype=torch.bool)], 1)
        p = cfg.latent_patch
        grid = grid_carrier(latents.shape[-2] // p, latents.shape[-1] // p, img.device)
        return (img, txt, temb, cos, sin, encode_mask(mask), grid)

    def run_blocks(self, gen, lo, hi, state):
        img, txt, temb, cos, sin, mask_f, shape = state
        mask = none_if_unpadded(decode_mask(mask_f))
        blocks = gen.blocks()
        n_double = len(gen.double_blocks)
        x = None
        for i in range(lo, hi):
            if i < n_double:
                img, txt = blocks[i](img, txt, temb, (cos, sin), mask)
            else:
                if x is None:
                    x = torch.cat([txt, img], 1)
                x = blocks[i](x, temb, (cos, sin), mask)
        if x is not None:
            txt, img = x[:, : txt.shape[1]], x[:, txt.shape[1]:]
        return (img, txt, temb, cos, sin, mask_f, shape)

    def head(self, gen, state):
        from iomm_scale.models.flux_mmdit import unpack_latents
        from iomm_scale.models.layers import layer_norm_no_affine, modulate

        img, txt, temb, cos, sin, mask, shape = state
        scale, shift = gen.norm_out_mod(F.silu(temb)).chunk(2, -1)
        out = gen.proj_out(modulate(layer_norm_no_affine(img), shift, scale))
        p = gen.cfg.latent_patch
        c = out.shape[-1] // (p * p)
        return unpack_latents(out, (img.shape[0], c, shape.shape[0] * p, shape.shape[1] * p), p)


def _complex_to_real(z: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(z).contiguous()


def _real_to_complex(r: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(r.contiguous())


class S3DiTAdapter(PipelineAdapter):
    """Z-Image S3-DiT: noise refiner (image), context refiner (condition), then the main
    single-stream layers over [image | condition] (mirrors S3DiT._forward_padded for
    same-size images). The condition is padded to a fixed length (a multiple of 32 over
    the whole condition width, not the longest real length of the micro-batch) so that
    every micro-batch has the same shapes; the extra positions are batch padding, masked."""

    head_modules = ("norm_out_mod", "proj_out")

    def embed(self, gen, latents, t, cond, cond_mask):
        from iomm_scale.models import s3dit as S

        cfg = gen.cfg
        b, c, hgt, wid = latents.shape
        p = cfg.patch_size
        patches = latents.reshape(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        cond, cap_lens = S.real_tokens_first(cond, cond_mask)
        dev = patches.device
        temb = gen.t_embedder(S.timestep_embedding((1 - t) * cfg.t_scale).to(patches.dtype))
        cap_lens = torch.as_tensor(cap_lens, device=dev)
        cap_pad = S._round_up(cap_lens)
        sc = int(S._round_up(torch.tensor(cond.shape[1])))
        cap = F.pad(cond, (0, 0, 0, sc - cond.shape[1])) if cond.shape[1] < sc else cond
        j = torch.arange(sc, device=dev)
        cap_real, cap_keep = j < cap_lens[:, None], j < cap_pad[:, None]
        cap = torch.where(cap_real[..., None], gen.cap_embedder(gen.cap_norm(cap)), gen.cap_pad_token.to(cap.dtype))
        cap_ids = torch.stack([j + 1, torch.zeros_like(j), torch.zeros_like(j)], -1).expand(b, sc, 3)
        grid = (1, hgt // p, wid // p)
        n = hgt // p * (wid // p)
        sx = int(S._round_up(torch.tensor(n)))
        patches = F.pad(patches, (0, 0, 0, sx - n)) if n < sx else patches
        k = torch.arange(sx, device=dev)
        img_real = (k < n)[None].expand(b, sx)
        x = torch.where(img_real[..., None], gen.x_embedder(patches), gen.x_pad_token.to(patches.dtype))
        img_ids = torch.zeros(b, sx, 3, dtype=torch.long, device=dev)
        img_ids[:, :n] = S._grid_ids(grid, dev)
        img_ids[..., 0] += torch.where(img_real, cap_pad[:, None] + 1, 0)
        x_rope = S.rope_tables(img_ids, cfg.axes_dims, cfg.rope_theta)
        cap_rope = S.rope_tables(cap_ids, cfg.axes_dims, cfg.rope_theta)
        cap_refine_keep = cap_keep | (cap_pad == 0)[:, None]
        img_keep = (k < sx)[None].expand(b, sx)  # same-size images: up to the multiple of 32 is kept
        carrier = grid_carrier(hgt // p, wid // p, dev)
        return (x, cap, temb, _complex_to_real(x_rope), _complex_to_real(cap_rope), encode_mask(img_keep),
                encode_mask(cap_keep), encode_mask(cap_refine_keep), carrier)

    def run_blocks(self, gen, lo, hi, state):
        x, cap, temb, x_rope_r, cap_rope_r, img_keep_f, cap_keep_f, cap_refine_f, carrier = state
        x_rope, cap_rope = _real_to_complex(x_rope_r), _real_to_complex(cap_rope_r)
        img_keep, cap_keep, cap_refine = decode_mask(img_keep_f), decode_mask(cap_keep_f), decode_mask(cap_refine_f)
        img_keep_or_none, cap_refine = none_if_unpadded(img_keep), none_if_unpadded(cap_refine)
        r = len(gen.noise_refiner)
        blocks = gen.blocks()
        h = None
        for i in range(lo, hi):
            if i < r:
                x = blocks[i](x, x_rope, img_keep_or_none, temb)
            elif i < 2 * r:
                cap = blocks[i](cap, cap_rope, cap_refine)
            else:
                if h is None:
                    h = torch.cat([x, cap], 1)
                    rope = torch.cat([x_rope, cap_rope], 1)
                    keep = none_if_unpadded(torch.cat([img_keep, cap_keep], 1))
                h = blocks[i](h, rope, keep, temb)
        if h is not None:
            x, cap = h[:, : x.shape[1]], h[:, x.shape[1]:]
        return (x, cap, temb, x_rope_r, cap_rope_r, img_keep_f, cap_keep_f, cap_refine_f, carrier)

    def head(self, gen, state):
        x, cap, temb, *_, carrier = state
        cfg = gen.cfg
        p = cfg.patch_size
        ht, wt = carrier.shape
        scale = gen.norm_out_mod(F.silu(temb)).unsqueeze(1)
        from iomm_scale.models.layers import layer_norm_no_affine

        out = gen.proj_out(layer_norm_no_affine(x) * (1 + scale))
        b, c = out.shape[0], out.shape[-1] // (p * p)
        out = out[:, : ht * wt].reshape(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, ht * p, wt * p)
        return -out


class QwenAdapter(PipelineAdapter):
    """Qwen-Image MMDiT: double-stream blocks only (mirrors QwenMMDiT.forward_tokens).
    The condition keeps its full width (real tokens first, rest masked) rather than being
    cut to the micro-batch's longest real length, so every micro-batch has one shape; the
    real tokens see the same positions and the same attention either way."""

    head_modules = ("norm_out_mod", "proj_out")

    def embed(self, gen, latents, t, cond, cond_mask):
        from iomm_scale.models import qwen_mmdit as Q
        from iomm_scale.models.flux_mmdit import pack_latents

        cfg = gen.cfg
        p = cfg.patch_size
        tokens, _ = pack_latents(latents, p)
        if cond_mask is not None:
            mask_c = cond_mask.bool()
            order = torch.sort((~mask_c).to(torch.int8), dim=1, stable=True).indices
            cond = torch.gather(cond, 1, order[..., None].expand_as(cond))
            mask_c = torch.gather(mask_c, 1, order)
        else:
            mask_c = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
        img = gen.img_in(tokens)
        txt = gen.txt_in(gen.txt_norm(cond))
        temb = gen.time_embedder(Q.qwen_timestep_embedding(t).to(img.dtype))
        shapes = [(1, latents.shape[2] // p, latents.shape[3] // p)]
        img_ids, txt_ids = Q.qwen_positions(shapes, txt.shape[1], img.device)
        img_rope = Q.rope_tables(img_ids, cfg.axes_dims_rope, cfg.rope_theta)
        txt_rope = Q.rope_tables(txt_ids, cfg.axes_dims_rope, cfg.rope_theta)
        mask = torch.cat([mask_c, img.new_ones(img.shape[:2], dtype=torch.bool)], 1)
        carrier = grid_carrier(latents.shape[2] // p, latents.shape[3] // p, img.device)
        return (img, txt, temb, _complex_to_real(img_rope), _complex_to_real(txt_rope), encode_mask(mask), carrier)

    def run_blocks(self, gen, lo, hi, state):
        img, txt, temb, img_rope_r, txt_rope_r, mask_f, carrier = state
        img_rope, txt_rope = _real_to_complex(img_rope_r), _real_to_complex(txt_rope_r)
        mask = none_if_unpadded(decode_mask(mask_f))
        blocks = gen.blocks()
        for i in range(lo, hi):
            img, txt = blocks[i](img, txt, temb, img_rope, txt_rope, mask)
        return (img, txt, temb, img_rope_r, txt_rope_r, mask_f, carrier)

    def head(self, gen, state):
        from iomm_scale.models.flux_mmdit import unpack_latents
        from iomm_scale.models.layers import layer_norm_no_affine, modulate
        from iomm_scale.models.qwen_mmdit import EPS

        img, txt, temb, *_, carrier = state
        p = gen.cfg.patch_size
        scale, shift = gen.norm_out_mod(F.silu(temb)).chunk(2, -1)
        out = gen.proj_out(modulate(layer_norm_no_affine(img, EPS), shift, scale))
        c = out.shape[-1] // (p * p)
        return unpack_latents(out, (img.shape[0], c, carrier.shape[0] * p, carrier.shape[1] * p), p)


ADAPTERS: dict[str, PipelineAdapter] = {"FluxMMDiT": FluxAdapter(), "S3DiT": S3DiTAdapter(), "QwenMMDiT": QwenAdapter()}


def register_adapter(class_name: str, adapter: PipelineAdapter) -> None:
    ADAPTERS[class_name] = adapter


class _ModelMethodsAdapter(PipelineAdapter):
    def __init__(self, gen):
        self.head_modules = tuple(getattr(gen, "pipeline_head_modules", ()))

    def embed(self, gen, latents, t, cond, cond_mask):
        return gen.pipeline_embed(latents, t, cond, cond_mask)

    def run_blocks(self, gen, lo, hi, state):
        return gen.pipeline_blocks(lo, hi, state)

    def head(self, gen, state):
        return gen.pipeline_head(state)


def get_adapter(gen: nn.Module) -> PipelineAdapter:
    if hasattr(gen, "pipeline_embed"):
        return _ModelMethodsAdapter(gen)
    for cls in type(gen).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise NotImplementedError(f"no pipeline adapter for {type(gen).__name__}; known: {sorted(ADAPTERS)} "
                              "(add one in iomm_scale/parallel/pipeline.py)")


# --------------------------------------------------------------------------- splitting
def stage_range(num_blocks: int, num_stages: int, stage: int) -> tuple[int, int]:
    if num_blocks % num_stages:
        raise ValueError(f"{num_blocks} blocks do not split evenly into {num_stages} stages")
    n = num_blocks // num_stages
    return stage * n, (stage + 1) * n


class _Placeholder(nn.Module):
    """Stands in for a block or module another stage owns (no parameters)."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called by a correct adapter
        raise RuntimeError("this part of the model lives on another pipeline stage")


def _prune(gen: nn.Module, adapter: PipelineAdapter, lo: int, hi: int, first: bool, last: bool) -> None:
    blocks = gen.blocks()
    keep = {id(b) for b in blocks[lo:hi]}
    block_ids = {id(b) for b in blocks}
    # Blocks of other stages -> placeholders, in place in their containers.
    for parent in list(gen.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in block_ids and id(child) not in keep:
                parent._modules[name] = _Placeholder()
    # Top-level non-block modules: prologue on the first stage, head on the last.
    for name, child in list(gen.named_children()):
        if child is None or any(id(m) in block_ids for m in child.modules()) or isinstance(child, nn.ModuleList):
            continue
        owned = last if name in adapter.head_modules else first
        if not owned:
            gen._modules[name] = _Placeholder()
    # Parameters directly on the generator root (e.g. S3-DiT's pad tokens) belong to the
    # prologue: the first stage keeps them, later stages drop them.
    if not first:
        for name in [n for n, _ in gen.named_parameters(recurse=False)]:
            del gen._parameters[name]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. DeepSpeed sends the gradient of a
    stage's input back to the previous stage as autograd left it, and gloo / NCCL send only
    contiguous tensors; the gradient of an input the stage slices or concatenates (FLUX's and
    Z-Image's text / image halves of the joint sequence) is a strided view once the micro-batch
    is larger than 1."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(x):
    return _ContiguousGrad.apply(x) if isinstance(x, torch.Tensor) and x.requires_grad else x


class PipelineStageModule(nn.Module):
    """One pipeline stage of an IOMM model or bare generator.

    First stage: forward(*args) with args for `prologue(model, *args)`, which returns
    (latents, t, cond, cond_mask, *extras); the default prologue takes those directly.
    Later stages: forward(*state, *extras). Last stage returns (velocity, *extras).
    """

    def __init__(self, model: nn.Module, stage: int, num_stages: int, *,
                 prologue: Callable | None = None, generator_attr: str | None = None):
        super().__init__()
        gen = getattr(model, generator_attr) if generator_attr else getattr(model, "generator", model)
        adapter = get_adapter(gen)
        lo, hi = stage_range(len(gen.blocks()), num_stages, stage)
        first, last = stage == 0, stage == num_stages - 1
        _prune(gen, adapter, lo, hi, first, last)
        if gen is not model and not first:
            # Everything beside the generator (conditioner, VAE) runs on the first stage only.
            for name, child in list(model.named_children()):
                if child is not gen:
                    model._modules[name] = _Placeholder()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, prm in model.named_parameters(recurse=False):
            self.register_parameter(name, prm)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_gen", gen)
        self.adapter, self.prologue = adapter, prologue
        self.stage, self.num_stages, self.lo, self.hi = stage, num_stages, lo, hi
        self.first, self.last = first, last
        self._n_state = None

    def forward(self, *args):
        if self.first:
            inputs = self.prologue(self._model, *args) if self.prologue else args
            latents, t, cond, cond_mask, *extras = inputs
            state = tuple(self.adapter.embed(self._gen, latents, t, cond, cond_mask))
        else:
            n = len(args) - self._n_extras_in()
            state, extras = tuple(_contiguous_grad(a) for a in args[:n]), list(args[n:])
        state = tuple(self.adapter.run_blocks(self._gen, self.lo, self.hi, state))
        self.n_extras = len(extras)
        if self.last:
            return (self.adapter.head(self._gen, state), *extras)
        # sent to the next stage as they are: slices of the joint sequence are strided views
        return (*(s.contiguous() for s in state), *extras)

    def _n_extras_in(self) -> int:
        return getattr(self, "n_extras_in", 0)

    @torch.no_grad()
    def sample_losses(self, batch: dict, draws, pp_group) -> torch.Tensor:
        """Per-sample losses [B] of an IOMM model's micro-batch under fixed `draws` (held-out
        evaluation), forward only and without the schedule: the first stage runs
        `prepare_generator_inputs(batch, draws)` (any batch, captions too) and its blocks, each
        stage hands (*state, target) to the next by send / recv (shapes sent ahead: a state's
        shapes depend on the batch), the last computes the losses; every stage returns them."""
        import torch.distributed as dist

        ranks = dist.get_process_group_ranks(pp_group)
        if self.first:
            x_t, t, cond, cond_mask, target = self._model.prepare_generator_inputs(batch, draws)
            state, target = tuple(self.adapter.embed(self._gen, x_t, t, cond, cond_mask)), target
        else:
            *state, target = _recv_tensors(ranks[self.stage - 1], pp_group, self._device())
        state = tuple(self.adapter.run_blocks(self._gen, self.lo, self.hi, tuple(state)))
        if not self.last:
            _send_tensors([*state, target], ranks[self.stage + 1], pp_group)
            losses = torch.empty(target.shape[0], dtype=torch.float32, device=target.device)
        else:
            from ..flow import per_sample_loss

            losses = per_sample_loss(self.adapter.head(self._gen, state), target)
        dist.broadcast(losses, src=ranks[-1], group=pp_group)  # the last stage's figures on every stage
        return losses

    def _device(self) -> torch.device:
        p = next(iter(self.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def sample_grid(self, cfg, device, pp_group, part=None):
        """The references and samples of train/trainer.sample_grid (`part`: this replica's share of
        the rows), the model cut in stages: the first stage runs the conditioner, the sampler's
        loop and the VAE; each of the sampler's `flow.sample_steps` velocity calls sends the state
        down the stages (shapes first) and the last stage sends the velocity back to the first.
        Every stage calls it; the first returns (references, samples), the others (None, None)."""
        import torch.distributed as dist

        ranks = dist.get_process_group_ranks(pp_group)
        if self.first:
            from ..train.trainer import sample_grid

            def through_stages(x, t, cond, cond_mask):
                state = tuple(self.adapter.embed(self._gen, x, t, cond, cond_mask))
                _send_tensors(self.adapter.run_blocks(self._gen, self.lo, self.hi, state), ranks[1], pp_group)
                v = torch.empty(x.shape, dtype=torch.float32, device=x.device)
                dist.recv(v, src=ranks[-1], group=pp_group)
                return v

            return sample_grid(self._model, cfg, device, generator_fn=through_stages, part=part)
        for _ in range(cfg.flow.sample_steps):  # IOMMModel.sample's velocity calls, one per step
            state = tuple(_recv_tensors(ranks[self.stage - 1], pp_group, self._device()))
            state = tuple(self.adapter.run_blocks(self._gen, self.lo, self.hi, state))
            if self.last:
                dist.send(self.adapter.head(self._gen, state).float().contiguous(), dst=ranks[0], group=pp_group)
            else:
                _send_tensors(state, ranks[self.stage + 1], pp_group)
        return None, None


def _send_tensors(tensors, dst: int, group) -> None:
    """Tensors to the next stage outside the schedule: their shapes and dtypes first (they depend
    on the batch), then each one, contiguous (slices of the joint sequence are strided views)."""
    import torch.distributed as dist

    out = [x.contiguous() for x in tensors]
    dist.send_object_list([[(tuple(x.shape), x.dtype) for x in out]], dst=dst, group=group)
    for x in out:
        dist.send(x, dst=dst, group=group)


def _recv_tensors(src: int, group, device) -> list[torch.Tensor]:
    """What _send_tensors sent from `src`."""
    import torch.distributed as dist

    meta = [None]
    dist.recv_object_list(meta, src=src, group=group)
    received = []
    for shape, dtype in meta[0]:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src=src, group=group)
        received.append(buf)
    return received


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Flow-matching MSE, || v_pred - (z - x) ||^2 averaged, in float32."""
    return F.mse_loss(pred.float(), target.float())


class Pipeline:
    """A Schedule1F1B over one stage engine; `step(args, target)` runs fwd+bwd of all
    micro-batches (no optimizer step) and returns the mean loss on every PP rank."""

    def __init__(self, engine, stage_module: PipelineStageModule, num_microbatches: int, pp_group,
                 loss_fn: Callable = flow_loss, n_extras: int = 0, target_from_extras: bool = False):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        self.engine, self.module, self.m = engine, stage_module, num_microbatches
        self.pp_group = pp_group
        self.loss_fn = loss_fn
        stage_module.n_extras_in = n_extras
        self.target_from_extras = target_from_extras
        device = next(iter(engine.module.parameters())).device if any(True for _ in engine.module.parameters()) \
            else torch.device("cpu")
        self.stage = PipelineStage(engine, stage_module.stage, stage_module.num_stages, device, group=pp_group)
        m = num_microbatches

        def scaled_loss(output, target):
            if isinstance(output, (tuple, list)):
                pred, extras = output[0], output[1:]
            else:
                pred, extras = output, ()
            if target_from_extras:
                target = extras[0]
            # a NaN / inf loss with finite gradients must not be applied either (train/nonfinite.py)
            return poison_nonfinite(self.loss_fn(pred, target)) / m

        self.schedule = Schedule1F1B(self.stage, n_microbatches=m, loss_fn=scaled_loss, scale_grads=False)

    def step(self, args: Sequence[torch.Tensor] = (), target: torch.Tensor | None = None) -> torch.Tensor:
        import torch.distributed as dist

        losses: list = []
        if self.module.first:
            self.schedule.step(*args)
        elif self.module.last:
            if self.target_from_extras:
                # pipelining still wants a whole-batch target to chunk: a zero-size stand-in per micro-batch
                target = torch.zeros(self.m, 1)
            self.schedule.step(target=target, losses=losses)
        else:
            self.schedule.step()
        loss = torch.stack([l.detach() for l in losses]).sum() if losses else torch.zeros(())
        loss = loss.float().reshape(1)
        dist.all_reduce(loss, group=self.pp_group)  # the last stage's value on every stage
        return loss[0]
