"""Per-device memory planner: will this family x resolution x layout x micro-batch fit?

    from iomm_scale.profiling.memory import Layout, plan_memory
    plan = plan_memory(cfg, Layout(dp=8, zero_stage=2, micro_batch=32, checkpointing="full"))
    print(plan.table())

What is counted, per device (the most loaded pipeline stage when pp > 1):

    parameters        trainable params on this rank (TP shard, PP stage), in the parameter
                      dtype; / dp under ZeRO-3
    gradients         same count, gradient dtype; / dp under ZeRO-2 and -3 (ZeRO-3 keeps them
                      in one flat partition buffer from start-up: held in every phase)
    optimizer         AdamW: 2 fp32 states per param; Muon: 1 fp32 momentum for the hidden
                      matrices Muon owns (routing = optim/muon.py's rules) + AdamW states for
                      the rest; + an fp32 master copy when parameters are bf16, and always
                      under DeepSpeed ZeRO >= 1 (its optimizer clones an fp32 partition even
                      of fp32 parameters). / dp under ZeRO >= 1 (on the host with
                      offload_optimizer)
    ema               fp32 copy of the trainable parameters, / dp at every ZeRO stage (each
                      data-parallel rank keeps a 1/dp slice: parallel/ema.py)
    frozen            the MLLM (+ its ViT) and the VAE in their configured dtype, replicated,
                      or / dp when ZeRO-3 partitions them; a LoRA base counts here too
    zero3 persistent  ZeRO-3 keeps every parameter of <= stage3_param_persistence_threshold
                      (1e5) elements whole on every rank (on top of its partition): biases,
                      norms, and whole small layers
    zero3 gathered    ZeRO-3's all-gathered parameters. Once DeepSpeed has recorded the
                      module trace (2nd step on) it prefetches ahead until
                      stage3_max_live_parameters (1e9) elements are resident and keeps a
                      parameter gathered if it is used again within stage3_max_reuse_distance
                      (1e9) elements of the trace (the end of the forward, which the backward
                      reuses first): min(partitioned params on the gradient path,
                      max(max_live, reuse / 2)); + the flat all-gather buffer of one prefetch
                      bucket (stage3_prefetch_bucket_size, 5e7), which lives until the last
                      parameter copied out of it is used
    comm buckets      DeepSpeed's gradient reduce / all-reduce bucket (reduce_bucket_size,
                      5e8 elements by default) when dp > 1; ZeRO-3 allocates it whole at
                      start-up (on the CPU only the pages one fill writes are resident)
    activations       (profiling/activation_trace.py) what autograd keeps for backward,
                      *measured from the model itself*: the
                      real modules (TP-sharded when tp > 1) run forward on the meta device at
                      the real shapes with torch.autograd.graph.saved_tensors_hooks counting
                      the bytes of every distinct storage saved for backward (parameters
                      excluded), per unit (conditioner RQA / frozen LLM / projection,
                      generator prologue, each block of generator.blocks(), head, loss).
                      Attention is counted as the fused kernels keep it (q, k, v, out and
                      the log-sum-exp; no S x S matrix) unless the family is configured with
                      the `math` backend. Checkpointing (none / full / every_k) then keeps,
                      for a checkpointed block, only its input (the residual stream), and
                      rematerialises one block at a time during backward. Compiled blocks
                      (`Layout.compile` on / all, as train.compile / compile_mllm do) are
                      traced through torch.compile with the backend
                      "aot_eager_decomp_partition": inductor's decompositions and its min-cut
                      partitioner (which recomputes cheap pointwise ops in backward instead
                      of saving their outputs), run eagerly on the meta device, so what is
                      counted is what inductor's forward graph saves.
    transients        backward working set (the gradient of a block's output and of its
                      largest saved tensor), one rematerialised block under checkpointing,
                      the optimizer step's temporaries (torch's foreach AdamW: one fp32 copy;
                      DeepSpeed: the fp32 gradient partition; ZeRO-3: the flattened fp32
                      gradient partition + AdamW's temporaries on it, per sub-group), bf16
                      weight copies under autocast (`amp`)

The ZeRO-3 terms were checked against a real 2-process DeepSpeed ZeRO-3 step (gloo, CPU:
tests/profiling/test_memory_zero3.py), with DeepSpeed's default buffers and with all four
set below the model's size.

Peaks are taken per phase and the largest reported: start of backward (all kept
activations + the head's working set), the start of each block's backward (kept
activations of earlier blocks + that block's full set, kept or rematerialised + gradients
of the later blocks + its working set), the
frozen LLM's backward (its activations, or their recompute, + every generator gradient),
and the optimizer step (all gradients + step temporaries). "allocated" is what
torch.cuda.max_memory_allocated would report; "device" adds the CUDA context / NCCL /
cuBLAS reserve and a fragmentation margin, which that counter does not see.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ..parallel.checkpointing import select_blocks
from ..train.compile import COMPILE_MODES, compile_layout_errors
from .activation_trace import _trace_for

GiB = 1024 ** 3
DS_PREFETCH_BUCKET = 50_000_000  # DeepSpeed stage3_prefetch_bucket_size default (elements)
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed reduce_bucket_size / allreduce_bucket_size default (elements)
DS_MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed stage3_max_live_parameters default (elements)
DS_MAX_REUSE_DISTANCE = 1_000_000_000  # DeepSpeed stage3_max_reuse_distance default (elements)
DS_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed stage3_param_persistence_threshold default (elements)
DS_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed sub_group_size default: ZeRO-3 steps the optimizer per sub-group
PRECISIONS = ("fp32", "amp", "bf16")


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    micro_batch: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step (1F1B micro-batches when pp > 1)
    checkpointing: str = "none"  # none | full | every_k
    every_k: int = 1
    checkpoint_mllm: bool | str = False  # False | True ("layers", as parallel/checkpointing.py does) | "whole" (what-if)
    offload_optimizer: bool = False
    offload_params: bool = False
    compile: str = "off"  # off | on (generator blocks torch.compile'd: train.compile) | all (+ the LLM's layers)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        ck = self.checkpointing if self.checkpointing != "every_k" else f"every_{self.every_k}"
        return (f"tp{self.tp} pp{self.pp} dp{self.dp} zero{self.zero_stage} mb{self.micro_batch} x{self.grad_accum} "
                f"ckpt={ck}{_mllm_tag(self.checkpoint_mllm)}" + ("" if self.compile == "off" else f" compile={self.compile}"))


def _mllm_tag(mode) -> str:
    return "" if mode in (False, None, "none") else ("+mllm" if mode == "whole" else "+mllm/layer")


@dataclass
class MemoryPlan:
    layout: Layout
    rows: list[tuple[str, float, str]]  # (component, bytes, how)
    phases: dict[str, float]
    allocated: float  # peak allocated bytes (what torch.cuda.max_memory_allocated / the RSS delta sees)
    reserve: float  # CUDA context + NCCL + cuBLAS workspaces + fragmentation margin
    host: float = 0.0  # offloaded bytes living in host memory
    notes: list[str] = field(default_factory=list)
    capacity: float | None = None

    @property
    def device_total(self) -> float:
        return self.allocated + self.reserve

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.device_total <= self.capacity

    def component(self, name: str) -> float:
        return sum(b for n, b, _ in self.rows if n == name)

    def table(self) -> str:
        lines = [f"layout: {self.layout.describe()}"]
        for name, b, how in self.rows:
            lines.append(f"  {name:<26s} {b / GiB:>9.2f} GiB  {how}")
        for name, b in self.phases.items():
            lines.append(f"  phase {name:<20s} {b / GiB:>9.2f} GiB")
        lines.append(f"  {'peak allocated':<26s} {self.allocated / GiB:>9.2f} GiB")
        lines.append(f"  {'+ runtime reserve':<26s} {self.reserve / GiB:>9.2f} GiB")
        fit = "" if self.capacity is None else f"  of {self.capacity / GiB:.0f} GiB: {'fits' if self.fits else 'DOES NOT FIT'}"
        lines.append(f"  {'device total':<26s} {self.device_total / GiB:>9.2f} GiB{fit}")
        if self.host:
            lines.append(f"  {'host (offloaded)':<26s} {self.host / GiB:>9.2f} GiB")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# building the model on the meta device (TP-local shapes when tp > 1)
# ------------------------------------------------------------------------------------------
def _local_linear_factory(tp: int):
    """What one TP rank holds: column layers keep out/tp outputs (each fused segment split),
    row layers in/tp inputs; replicate layers are whole. Shapes only (meta device)."""

    def factory(in_features, out_features, bias=True, tp_style="replicate", tp_fused_sizes=None):
        if tp_style == "column":
            out_features //= tp
        elif tp_style == "row":
            in_features //= tp
        layer = nn.Linear(in_features, out_features, bias=bias)
        layer.tp_style = tp_style
        sharded = tp_fused_sizes and tp_style in ("column", "row")
        layer.tp_fused_sizes = tuple(s // tp for s in tp_fused_sizes) if sharded else None
        return layer

    return factory


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass
class _Structure:
    generator: nn.Module
    blocks: list
    rqa: nn.Module
    proj: nn.Module
    mllm: nn.Module | None
    vae_params: int
    mllm_params: int
    mllm_largest_layer: int
    lora_params: int
    muon_params: int  # trainable params Muon would own
    gen_prologue_params: int
    gen_head_params: int
    block_params: list[int]
    block_trainable: list[int]
    # per-parameter element counts, for ZeRO-3's persistence threshold (whole model, pp 1)
    trainable_numels: list[int] = field(default_factory=list)  # generator (trainable part), RQA, projection
    gen_frozen_numels: list[int] = field(default_factory=list)  # a LoRA base
    mllm_numels: list[int] = field(default_factory=list)  # the whole frozen MLLM (ViT, projector, LLM, lm_head)
    mllm_lm_numels: list[int] = field(default_factory=list)  # its language model: on the RQA's gradient path
    vae_numels: list[int] = field(default_factory=list)


def _build_structure(cfg, tp: int, lora_rank: int | None, dtype: torch.dtype, mllm_dtype: torch.dtype,
                     build_mllm: bool = True) -> _Structure:
    from ..models.layers import RMSNorm, linear, use_linear_factory
    from ..models.registry import build_generator
    from ..models.rqa import ResidualQueryAdapter
    from .flops import LORA_TARGETS, mllm_spec

    family = cfg.model.generator.family
    spec = mllm_spec(cfg.model.conditioner.mllm)
    with torch.device("meta"):
        if tp > 1:
            with use_linear_factory(_local_linear_factory(tp)):
                gen = build_generator(family, cfg.generator)
        else:
            gen = build_generator(family, cfg.generator)
        rqa = ResidualQueryAdapter(spec.hidden, cfg.model.conditioner.rqa)
        proj = nn.Sequential(RMSNorm(spec.hidden), linear(spec.hidden, cfg.generator.context_dim))
    gen.to(dtype)
    rqa.to(dtype)
    proj.to(dtype)
    lora_params = 0
    if lora_rank:
        from peft import LoraConfig, inject_adapter_in_model

        gen.requires_grad_(False)
        with torch.device("meta"):
            gen = inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                                     target_modules=LORA_TARGETS[family]), gen)
        gen.to(dtype)
        for n, p in gen.named_parameters():
            p.requires_grad_("lora_" in n)
        lora_params = sum(p.numel() for n, p in gen.named_parameters() if "lora_" in n)
    blocks = list(gen.blocks())
    block_params = [_numel(b) for b in blocks]
    block_trainable = [sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks]
    head_names = ("norm_out_mod", "proj_out")
    head = sum(_numel(getattr(gen, n, None)) for n in head_names)
    prologue = _numel(gen) - sum(block_params) - head

    mllm, mllm_params, largest = None, 0, 0
    mllm_numels, lm_numels = [], []
    if build_mllm:
        mllm = _mllm_on_meta(spec, mllm_dtype)
        mllm_params = _numel(mllm)
        layers = [m for m in mllm.modules() if type(m).__name__.endswith(("DecoderLayer", "VisionLayer", "VisionBlock"))]
        largest = max((_numel(m) for m in layers), default=0)
        mllm_numels = [p.numel() for p in mllm.parameters()]
        lm_numels = [p.numel() for p in mllm.model.language_model.parameters()]
    vae_params = _vae_params(cfg.model.vae)
    trainable_numels = [p.numel() for m in (gen, rqa, proj) for p in m.parameters() if p.requires_grad]
    gen_frozen_numels = [p.numel() for p in gen.parameters() if not p.requires_grad]

    # what Muon would own (optim/muon.py's routing over the same tree as IOMMModel)
    muon = 0
    if cfg.optim.name == "muon":
        from ..optim.muon import build_muon_param_groups

        holder = nn.Module()
        holder.generator = gen
        holder.conditioner = nn.Module()
        holder.conditioner.rqa = rqa
        holder.conditioner.proj_norm, holder.conditioner.proj = proj[0], proj[1]
        groups = build_muon_param_groups(holder, modulation=cfg.optim.muon.modulation)
        muon = sum(p.numel() for g in groups if g["use_muon"] for p in g["params"])
    return _Structure(gen, blocks, rqa, proj, mllm, vae_params, mllm_params, largest, lora_params, muon, prologue,
                      head, block_params, block_trainable, trainable_numels, gen_frozen_numels, mllm_numels, lm_numels,
                      _vae_numels(cfg.model.vae))


def _mllm_on_meta(spec, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        if spec.kind == "internvl":
            from transformers import InternVLConfig, InternVLForConditionalGeneration

            model = InternVLForConditionalGeneration(InternVLConfig(**spec.hf_config))
        else:
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**spec.hf_config))
    return model.to(dtype).requires_grad_(False).eval()


@functools.lru_cache(maxsize=16)
def _vae_params_cached(vtype, path, subfolder, random_init) -> int:
    from types import SimpleNamespace

    from .flops import _vae_model_on_meta

    return _numel(_vae_model_on_meta(SimpleNamespace(type=vtype, path=path, subfolder=subfolder, random_init=random_init)))


# Parameter counts of the known VAEs (from their diffusers configs, built on the meta device
# here), for machines without diffusers (the GPU check runs without it).
KNOWN_VAE_PARAMS = {"autoencoder_kl": 83_819_683, "autoencoder_kl_qwenimage": 126_892_531}


@functools.lru_cache(maxsize=16)
def _vae_numels_cached(vtype, path, subfolder, random_init) -> tuple[int, ...]:
    from types import SimpleNamespace

    from .flops import _vae_model_on_meta

    model = _vae_model_on_meta(SimpleNamespace(type=vtype, path=path, subfolder=subfolder, random_init=random_init))
    return tuple(p.numel() for p in model.parameters())


def _vae_numels(vcfg) -> list[int]:
    """Per-parameter sizes of the VAE (ZeRO-3 persistence); empty for the pixel VAE or
    without diffusers (its few small parameters are then left out)."""
    if vcfg.type == "pixel":
        return []
    try:
        return list(_vae_numels_cached(vcfg.type, vcfg.path, vcfg.subfolder, bool(vcfg.random_init)))
    except ImportError:
        return []


def _vae_params(vcfg) -> int:
    if vcfg.type == "pixel":
        return 0
    try:
        return _vae_params_cached(vcfg.type, vcfg.path, vcfg.subfolder, bool(vcfg.random_init))
    except ImportError:
        from .flops import KNOWN_VAES

        if (vcfg.type, vcfg.path) in KNOWN_VAES:
            return KNOWN_VAE_PARAMS[vcfg.type]
        raise


# ------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------
def _bytes_per(precision: str) -> tuple[int, int, int]:
    """(parameter, gradient, fp32 master) bytes per trainable parameter."""
    if precision == "fp32":
        return 4, 4, 0
    if precision == "amp":  # fp32 parameters, bf16 autocast (this repo's single-process trainer on CUDA)
        return 4, 4, 0
    return 2, 2, 4  # bf16 parameters + gradients, fp32 master in the optimizer (DeepSpeed bf16)


def stage_blocks(num_blocks: int, pp: int, stage: int) -> tuple[int, int]:
    if num_blocks % pp:
        raise ValueError(f"{num_blocks} blocks do not split evenly into pp={pp} stages")
    n = num_blocks // pp
    return stage * n, (stage + 1) * n


def checkpointed(num_blocks: int, layout: Layout) -> set[int]:
    """What parallel/checkpointing.py wraps (the model's last block never is)."""
    if layout.checkpointing not in ("none", "full", "every_k"):
        raise ValueError(f"checkpointing must be none | full | every_k, got {layout.checkpointing!r}")
    return set(select_blocks(num_blocks, layout.checkpointing, max(1, layout.every_k)))


def plan_memory(cfg, layout: Layout, *, resolution=None, precision: str | None = None, ema: bool | None = None,
                lora_rank: int | None = None, frozen: str = "auto", device: str = "cuda",
                capacity_gib: float | None = None, prefetch_bucket: int = DS_PREFETCH_BUCKET,
                reduce_bucket: int = DS_REDUCE_BUCKET, max_live_parameters: int = DS_MAX_LIVE_PARAMETERS,
                max_reuse_distance: int = DS_MAX_REUSE_DISTANCE, persistence_threshold: int = DS_PERSISTENCE_THRESHOLD,
                optimizer_impl: str | None = None,
                runtime_reserve_gib: float | None = None, fragmentation: float | None = None,
                mllm_len: int | None = None, _cache: dict | None = None) -> MemoryPlan:
    """Estimate per-device memory of one training step of `cfg` under `layout`.

    precision   "fp32" | "amp" (fp32 params + bf16 autocast, the single-process trainer) |
                "bf16" (bf16 params and grads + fp32 master: DeepSpeed); default: fp32 when
                train.precision is fp32, else amp for a single process without ZeRO, bf16 otherwise
    frozen      "replicate" | "zero3" | "auto" (ZeRO-3 partitions the frozen modules too)
    optimizer_impl  "torch" (foreach AdamW temporaries; default single process) or
                "deepspeed" (fused, fp32 gradient partition at step; default with ZeRO / dp > 1)
    prefetch_bucket, reduce_bucket, max_live_parameters, max_reuse_distance, persistence_threshold
                DeepSpeed's stage3_prefetch_bucket_size, reduce_bucket_size,
                stage3_max_live_parameters, stage3_max_reuse_distance,
                stage3_param_persistence_threshold (elements; defaults = DeepSpeed's, which
                parallel/deepspeed_engine.py keeps)
    """
    lay = layout
    if lay.compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {lay.compile!r}")
    if lay.compile != "off":
        errors = [msg for _, msg in compile_layout_errors(lay.tp, lay.pp, lay.zero_stage)]
        if not errors and (lay.tp > 1 or lay.pp > 1):  # train.compile runs there, the plan is not validated
            errors = [f"compiled blocks under tp={lay.tp} / pp={lay.pp} are not modelled (under tensor parallelism "
                      "they compile in pieces between megatron's linears; neither layout's compiled memory was "
                      "measured): plan with compile off, or with tp 1 and pp 1"]
        if errors:
            raise ValueError("; ".join(errors))
    if lora_rank is None:  # the run's LoRA (model.lora), counted on the default targets
        lora_rank = getattr(getattr(cfg.model, "lora", None), "r", None)
    if precision is None:
        if cfg.train.precision == "fp32":
            precision = "fp32"
        else:
            precision = "amp" if (lay.world == 1 and lay.zero_stage == 0) else "bf16"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if lay.pp > 1 and lay.zero_stage >= 2:
        raise ValueError("ZeRO-2/3 cannot be combined with pipeline parallelism (see parallel/config.py)")
    ema = bool(cfg.optim.ema_decay) if ema is None else ema
    frozen = ("zero3" if lay.zero_stage == 3 else "replicate") if frozen == "auto" else frozen
    distributed = lay.dp > 1 or lay.zero_stage > 0
    optimizer_impl = optimizer_impl or ("deepspeed" if distributed else "torch")
    cuda = device == "cuda"
    reserve_fixed = (runtime_reserve_gib if runtime_reserve_gib is not None else (2.0 if cuda else 0.0)) * GiB
    frag = fragmentation if fragmentation is not None else (0.05 if cuda else 0.0)

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    mllm_dtype = _dtype(cfg.model.conditioner.mllm.dtype)
    if precision == "fp32":
        mllm_dtype = torch.float32 if cfg.model.conditioner.mllm.dtype == "float32" else mllm_dtype
    cache = _cache if _cache is not None else {}
    skey = ("structure", lay.tp, lora_rank, dtype, mllm_dtype)
    if skey not in cache:
        cache[skey] = _build_structure(cfg, lay.tp, lora_rank, dtype, mllm_dtype)
    st = cache[skey]
    res = resolution if resolution is not None else cfg.data.resolution
    tr = _trace_for(cache, cfg, st, lay, lora_rank, dtype, mllm_dtype, res, mllm_len)

    p_b, g_b, master_b = _bytes_per(precision)
    if optimizer_impl == "deepspeed" and lay.zero_stage >= 1:
        # DeepSpeed's ZeRO optimizers keep their own fp32 partition of the trainable parameters
        # even when those are fp32 already (0.19.8: stage_1_and_2 always clones it; stage3's
        # "reuse the fp32 partition" shortcut compares a torch.device with a str, never equal).
        # Measured for ZeRO-3 (tests/profiling/test_memory_zero3.py).
        master_b = 4
    frozen_b = torch.finfo(mllm_dtype).bits // 8
    vae_b = torch.finfo(_dtype(cfg.model.vae.dtype)).bits // 8
    nb = len(st.blocks)
    ckpt = checkpointed(nb, lay)
    notes = []

    # ---- per stage: parameters and activations ---------------------------------------
    best = None
    for stage in range(lay.pp):
        lo, hi = stage_blocks(nb, lay.pp, stage)
        first, last = stage == 0, stage == lay.pp - 1
        gen_total = sum(st.block_params[lo:hi]) + (st.gen_prologue_params if first else 0) + \
            (st.gen_head_params if last else 0)
        cond_trainable = (_numel(st.rqa) + _numel(st.proj)) if first else 0
        if lora_rank:
            gen_train = sum(st.block_trainable[lo:hi])
            base_frozen = gen_total - gen_train
        else:
            gen_train, base_frozen = gen_total, 0
        trainable = gen_train + cond_trainable
        frozen_params = (st.mllm_params if first else 0)
        vae_params = st.vae_params if first else 0

        rows: list[tuple[str, float, str]] = []
        z = lay.zero_stage
        dp = lay.dp
        p_div = dp if z >= 3 else 1
        g_div = dp if z >= 2 else 1
        o_div = dp if z >= 1 else 1
        param_bytes = trainable * p_b / p_div
        if lay.offload_params and z == 3:
            host_params = param_bytes
            param_bytes = 0.0
        else:
            host_params = 0.0
        rows.append(("parameters", param_bytes,
                     f"{trainable / 1e6:.1f}M trainable x {p_b} B{' / dp' if p_div > 1 else ''}"
                     f"{' (offloaded to host)' if host_params else ''}"))
        grads_total = trainable * g_b / g_div
        rows.append(("gradients", grads_total, f"x {g_b} B{' / dp' if g_div > 1 else ''}"))
        if cfg.optim.name == "muon":
            everything = st.gen_prologue_params + sum(st.block_trainable) + st.gen_head_params + _numel(st.rqa) + \
                _numel(st.proj) if not lora_rank else sum(st.block_trainable) + _numel(st.rqa) + _numel(st.proj)
            muon = st.muon_params if lay.pp == 1 else int(st.muon_params * trainable / max(1, everything))
            states = muon * 4 + (trainable - muon) * 8
            how = f"Muon momentum 4 B x {muon / 1e6:.1f}M + AdamW 8 B x {(trainable - muon) / 1e6:.1f}M"
        else:
            states = trainable * 8
            how = "AdamW 2 x fp32"
        states += trainable * master_b
        if master_b:
            how += " + fp32 master"
        states /= o_div
        host_opt = 0.0
        if lay.offload_optimizer and z >= 1:
            host_opt, states = states, 0.0
            how += " (offloaded to host)"
        rows.append(("optimizer states", states, how + (" / dp" if o_div > 1 else "")))
        if ema:
            rows.append(("ema", trainable * 4 / dp, "fp32 copy" + (" / dp" if dp > 1 else "")))
        fz_div = dp if frozen == "zero3" else 1
        rows.append(("frozen mllm", frozen_params * frozen_b / fz_div,
                     f"{frozen_params / 1e9:.2f}B x {frozen_b} B" + (" / dp (ZeRO-3)" if fz_div > 1 else "")))
        if vae_params:
            rows.append(("frozen vae", vae_params * vae_b / fz_div, f"{vae_params / 1e6:.1f}M x {vae_b} B"
                         + (" / dp (ZeRO-3)" if fz_div > 1 else "")))
        if base_frozen:  # model.lora.base_dtype bfloat16: the base is stored in bf16 whatever the precision
            base_b = 2 if getattr(getattr(cfg.model, "lora", None), "base_dtype", "float32") == "bfloat16" else p_b
            rows.append(("frozen lora base", base_frozen * base_b / (dp if z >= 3 else 1),
                         f"{base_frozen / 1e9:.2f}B x {base_b} B (LoRA r={lora_rank}: {st.lora_params / 1e6:.1f}M adapters)"))
        gather = 0.0
        if z == 3:  # pp == 1 (checked above): the whole model is on this rank
            def persistent(numels):
                return sum(n for n in numels if n <= persistence_threshold)

            z3_frozen = frozen == "zero3"
            lora_base_b = base_b if base_frozen else p_b
            pers_train, pers_base = persistent(st.trainable_numels), persistent(st.gen_frozen_numels)
            pers_frozen = (persistent(st.mllm_numels), persistent(st.vae_numels)) if z3_frozen else (0, 0)
            persist = pers_train * p_b + pers_base * lora_base_b + pers_frozen[0] * frozen_b + pers_frozen[1] * vae_b
            rows.append(("zero3 persistent params", persist,
                         f"{(pers_train + pers_base + sum(pers_frozen)) / 1e6:.2f}M params of <= "
                         f"{persistence_threshold:.0e} el. kept whole (persistence threshold)"))
            # gathered at once around the turn from forward to backward, out of the partitioned
            # parameters both use (generator, RQA, projection and, when ZeRO-3 holds it, the frozen
            # LLM; not the no-grad ViT, released after its forward): once the module trace is
            # recorded (from the 2nd step) DeepSpeed prefetches ahead until max_live_parameters
            # elements are resident, and does not release a parameter used again within
            # max_reuse_distance elements of the trace (the last ~half of the forward, which the
            # backward reuses first); + the flat all-gather buffer of the prefetch bucket being
            # consumed (each parameter is copied out of it; it is freed with the bucket's last one)
            n_train, n_base = sum(st.trainable_numels) - pers_train, sum(st.gen_frozen_numels) - pers_base
            n_lm = sum(st.mllm_lm_numels) - persistent(st.mllm_lm_numels) if z3_frozen else 0
            n_np = n_train + n_base + n_lm
            per_el = (n_train * p_b + n_base * lora_base_b + n_lm * frozen_b) / max(1, n_np)
            live = min(n_np, max(max_live_parameters, max_reuse_distance // 2))
            staging = min(n_np, prefetch_bucket)
            gather = (live + staging) * per_el
            rows.append(("zero3 gathered params", gather,
                         f"{live / 1e6:.1f}M el. resident (max live {max_live_parameters:.0e}, reuse distance "
                         f"{max_reuse_distance:.0e}) + all-gather staging {staging / 1e6:.1f}M el. (prefetch bucket)"))
        bucket = 0.0
        if z == 3:
            # stage 3 allocates its gradient bucket (reduce_bucket_size elements) when it starts;
            # on the CPU only the pages written are resident: one fill, all gradients when fewer
            n = reduce_bucket if cuda else min(reduce_bucket, trainable)
            bucket = n * g_b
            rows.append(("comm buckets", bucket, f"ZeRO-3 gradient bucket {n / 1e6:.0f}M el."
                         + ("" if cuda else " (pages written)")))
        elif dp > 1:
            bucket = min(reduce_bucket, trainable) * g_b
            rows.append(("comm buckets", bucket, f"gradient reduce bucket {min(reduce_bucket, trainable) / 1e6:.0f}M el."))
        if precision == "amp":
            rows.append(("autocast weight copies", trainable * 2, "bf16 casts of fp32 weights, kept for backward"))

        # activations of this stage per micro-batch
        kept, full_acts = [], []
        for i in range(lo, hi):
            a = tr.units.get(f"block{i}", 0.0)
            full_acts.append(a)
            kept.append(tr.block_boundary[i] if i in ckpt else a)
        pre = 0.0
        if first:
            pre += tr.units.get("rqa", 0.0) + tr.units.get("projection", 0.0) + tr.units.get("prologue", 0.0)
            pre += tr.mllm_kept(lay.checkpoint_mllm)
            pre += tr.shared
        post = (tr.units.get("head", 0.0) + tr.units.get("loss", 0.0)) if last else 0.0
        per_mb = pre + sum(kept) + post
        in_flight = min(lay.pp - stage, lay.grad_accum) if lay.pp > 1 else 1
        acts = per_mb * in_flight
        recompute = max((full_acts[j] for j, i in enumerate(range(lo, hi)) if i in ckpt), default=0.0)
        # backward working set at the start of block i's backward: the gradient of its output
        # (one residual-stream tensor) and of its largest intermediate
        work = [tr.block_boundary[i] + tr.largest.get(f"block{i}", 0.0) for i in range(lo, hi)]
        rows.append(("activations", acts, f"{per_mb / GiB:.2f} GiB / micro-batch"
                                          + (f" x {in_flight} in flight (1F1B)" if in_flight > 1 else "")))
        rows.append(("recompute + bwd working set", recompute + max(work, default=0.0),
                     f"one rematerialised block {recompute / GiB:.2f} + output and largest-tensor gradients "
                     f"{max(work, default=0.0) / GiB:.2f}"))

        static = sum(b for n, b, _ in rows if n in ("parameters", "optimizer states", "ema", "frozen mllm", "frozen vae",
                                                     "frozen lora base", "comm buckets", "autocast weight copies",
                                                     "zero3 persistent params"))
        # held all along: accumulated across micro-batches, or ZeRO-3's flat gradient-partition
        # buffer (allocated when the engine starts, never freed)
        grads_held = grads_total if (lay.grad_accum > 1 or z == 3) else 0.0
        g_blocks = [st.block_trainable[i] * g_b / g_div for i in range(lo, hi)]
        g_head = st.gen_head_params * g_b / g_div if (last and not lora_rank) else 0.0
        phases = {}
        prev = acts - per_mb  # other in-flight micro-batches (1F1B)
        head_work = (tr.block_boundary[hi - 1] if hi > lo else 0.0) + max(tr.largest.get("head", 0.0),
                                                                           tr.largest.get("loss", 0.0))
        phases["start of backward"] = static + gather + grads_held + acts + (head_work if last else 0.0)
        peak_blocks = 0.0
        for j in range(len(kept)):
            # block j's backward begins: earlier blocks' kept activations, block j's full set
            # (kept, or rematerialised), gradients of the blocks after it (made already)
            alive = prev + pre + sum(kept[:j]) + full_acts[j]
            grads_now = grads_held if grads_held else sum(g_blocks[j + 1:]) + g_head
            peak_blocks = max(peak_blocks, static + gather + grads_now + alive + work[j])
        phases["generator backward"] = peak_blocks
        if first and st.mllm is not None:
            mllm_alive = tr.mllm_recompute(lay.checkpoint_mllm) + tr.units.get("rqa", 0.0) + \
                tr.units.get("projection", 0.0)
            gen_grads = grads_held if grads_held else (gen_train * g_b / g_div)
            phases["mllm backward"] = static + gather + gen_grads + mllm_alive + prev + \
                tr.mllm_boundary + max((v for k, v in tr.largest.items() if k.startswith("mllm")), default=0.0)
        step_tmp = 0.0
        if optimizer_impl == "torch":
            step_tmp = trainable * 4 / o_div  # foreach AdamW: one fp32 temporary over all params
        elif z == 3:
            # per sub-group: the flattened fp32 gradient partition + the client AdamW's temporaries
            # on that flat tensor (foreach on CUDA: one; the CPU single-tensor path: two)
            step_tmp = min(trainable / o_div, DS_SUB_GROUP_SIZE) * 4 * (2 if cuda else 3)
        elif master_b:
            step_tmp = trainable * 4 / o_div  # DeepSpeed: fp32 gradient partition during step
        if lay.offload_optimizer:
            step_tmp = 0.0
        phases["optimizer step"] = static + grads_total + step_tmp
        allocated = max(phases.values())
        plan = MemoryPlan(lay, rows, phases, allocated, reserve_fixed + frag * allocated, host_params + host_opt,
                          notes, capacity_gib * GiB if capacity_gib else None)
        if best is None or plan.allocated > best.allocated:
            best = plan
            if lay.pp > 1:
                best.notes = [f"pipeline stage {stage} of {lay.pp} (the most loaded)"]
    if precision == "amp" and device == "cuda":
        best.notes.append("amp: fp32 master weights on device, bf16 autocast (the single-process trainer)")
    return best


def max_micro_batch(cfg, layout: Layout, capacity_gib: float, *, limit: int = 256, **kw) -> tuple[int, MemoryPlan | None]:
    """Largest micro-batch whose plan fits `capacity_gib` (doubling then bisection)."""
    cache = kw.pop("_cache", {})
    fits = lambda mb: plan_memory(cfg, replace(layout, micro_batch=mb), capacity_gib=capacity_gib, _cache=cache, **kw)
    lo, best = 0, None
    mb = 1
    while mb <= limit:
        plan = fits(mb)
        if not plan.fits:
            break
        lo, best = mb, plan
        mb *= 2
    hi = min(mb, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        plan = fits(mid)
        if plan.fits:
            lo, best = mid, plan
        else:
            hi = mid
    return lo, best


def format_sweep(plans: list[MemoryPlan]) -> str:
    head = (f"{'layout':<50s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'frozen':>7s} {'acts':>7s} {'peak':>7s} "
            f"{'device':>7s}  fits")
    lines = [head, "-" * len(head)]
    for p in plans:
        fz = p.component("frozen mllm") + p.component("frozen vae") + p.component("frozen lora base")
        lines.append(f"{p.layout.describe():<50s} {p.component('parameters') / GiB:>7.1f} "
                     f"{p.component('gradients') / GiB:>7.1f} {p.component('optimizer states') / GiB:>7.1f} "
                     f"{fz / GiB:>7.1f} {p.component('activations') / GiB:>7.1f} {p.allocated / GiB:>7.1f} "
                     f"{p.device_total / GiB:>7.1f}  {'-' if p.fits is None else ('yes' if p.fits else 'NO')}")
    lines.append("(GiB per device; peak = allocated peak over the phases; device = + CUDA/NCCL reserve "
                 "and fragmentation margin)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# command line (tools/plan_memory.py)
# ------------------------------------------------------------------------------------------
def _bool_or_str(text: str):
    t = text.strip().lower()
    return {"false": False, "no": False, "none": False, "0": False, "true": True, "layers": True, "whole": "whole",
            "yes": True, "1": True}.get(t, t)


def main(argv=None) -> list[MemoryPlan]:  # tools/plan_memory.py
    import argparse

    from ..config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="plan_memory", description="Per-device memory estimate of a training step "
                                 "for a config x layout x micro-batch sweep (see profiling/memory.py).")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    ap.add_argument("--gpus", type=int, default=1, help="world size (dp = gpus / (tp * pp))")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per device")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--zero", default="0", help="comma list of ZeRO stages")
    ap.add_argument("--checkpointing", default="none,full", help="comma list: none, full, every_<k>")
    ap.add_argument("--checkpoint-mllm", default="false",
                    help="comma list: false; true / layers (per decoder layer, what parallel.checkpoint_mllm does); "
                         "whole (one checkpoint around the LLM: a what-if)")
    ap.add_argument("--compile", default=None,
                    help="comma list: off; on (generator blocks torch.compile'd, as train.compile); all (+ the frozen "
                         "LLM's decoder layers, as train.compile_mllm). Default: what the config's train section says")
    ap.add_argument("--micro-batch", default=None, help="comma list (default data.batch_size)")
    ap.add_argument("--global-batch", type=int, default=None, help="sets grad_accum = global / (micro x dp)")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--precision", choices=PRECISIONS, default=None)
    ap.add_argument("--lora-rank", type=int, default=None)
    ap.add_argument("--frozen", choices=("auto", "replicate", "zero3"), default="auto")
    ap.add_argument("--offload-optimizer", action="store_true")
    ap.add_argument("--max-micro-batch", action="store_true", help="also search the largest micro-batch that fits")
    ap.add_argument("--detail", action="store_true", help="print every plan's component table")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    if min(args.gpus, args.tp, args.pp) < 1 or args.gpus % (args.tp * args.pp):
        raise SystemExit(f"plan_memory: --gpus {args.gpus} must be a positive multiple of tp*pp = {args.tp * args.pp}")
    dp = args.gpus // (args.tp * args.pp)
    compile_modes = (args.compile.split(",") if args.compile else
                     ["all" if cfg.train.compile and cfg.train.compile_mllm else ("on" if cfg.train.compile else "off")])
    bad = []  # every malformed sweep value, named, before any plan is computed

    def ints(flag, text, lo, hi=None):
        try:
            vals = [int(x) for x in text.split(",")]
        except ValueError:
            bad.append(f"{flag} takes a comma list of integers, got {text!r}")
            return []
        wrong = [v for v in vals if v < lo or (hi is not None and v > hi)]
        if wrong:
            bad.append(f"{flag} {wrong[0]}: must be {lo}..{hi}" if hi is not None else f"{flag} {wrong[0]}: must be >= {lo}")
        return vals

    zeros = ints("--zero", args.zero, 0, 3)
    mbs = ints("--micro-batch", args.micro_batch, 1) if args.micro_batch else [cfg.data.batch_size]
    ckpts = args.checkpointing.split(",")
    for ck in ckpts:
        if ck not in ("none", "full") and not (ck.startswith("every_") and ck[6:].isdigit() and int(ck[6:]) >= 1):
            bad.append(f"--checkpointing {ck!r}: none, full or every_<k> with k >= 1")
    mllm_modes = list(dict.fromkeys(_bool_or_str(x) for x in args.checkpoint_mllm.split(",")))
    if [m for m in mllm_modes if m not in (False, True, "whole")]:
        bad.append(f"--checkpoint-mllm {args.checkpoint_mllm!r}: false, true / layers, or whole")
    if set(compile_modes) - set(COMPILE_MODES):
        bad.append(f"--compile takes {', '.join(COMPILE_MODES)}; got {args.compile!r}")
    if args.global_batch is not None and args.global_batch < 1:
        bad.append(f"--global-batch {args.global_batch}: must be >= 1")
    if bad:
        raise SystemExit("plan_memory: " + "; ".join(bad))
    if args.global_batch:
        skipped = [mb for mb in mbs if args.global_batch % (mb * dp)]
        if skipped:
            print(f"note: micro-batch {', '.join(map(str, skipped))} skipped: global batch {args.global_batch} is not "
                  f"a multiple of micro-batch x dp ({dp})")
    cache: dict = {}
    kw = dict(resolution=args.resolution, precision=args.precision, lora_rank=args.lora_rank, frozen=args.frozen,
              device=args.device, capacity_gib=args.gpu_mem, _cache=cache)
    plans, best = [], []
    res = args.resolution or cfg.data.resolution
    print(f"{cfg.source}: {cfg.model.generator.family}, {res} px, {args.gpus} x {args.gpu_mem:.0f} GiB "
          f"(tp {args.tp}, pp {args.pp}, dp {dp})" + (f", global batch {args.global_batch}" if args.global_batch else "")
          + (f", LoRA r={args.lora_rank}" if args.lora_rank else ""))
    for z in zeros:
        for ck in ckpts:
            mode, k = (("every_k", int(ck.split("_")[1])) if ck.startswith("every_") else (ck, 1))
            for cm, co in itertools.product(mllm_modes, compile_modes):  # true == layers
                base = Layout(tp=args.tp, pp=args.pp, dp=dp, zero_stage=z, checkpointing=mode, every_k=k,
                              checkpoint_mllm=cm, offload_optimizer=args.offload_optimizer, compile=co)
                for mb in mbs:
                    accum = cfg.train.grad_accum
                    if args.global_batch:
                        if args.global_batch % (mb * dp):
                            continue
                        accum = args.global_batch // (mb * dp)
                    case = replace(base, micro_batch=mb, grad_accum=accum)
                    try:
                        p = plan_memory(cfg, case, **kw)
                    except ValueError as e:
                        print(f"  {case.describe()}: {e}")
                        continue
                    plans.append(p)
                    if args.detail:
                        print(p.table())
                if args.max_micro_batch:
                    per_rank = args.global_batch // dp if args.global_batch else None
                    accum = 2 if per_rank else max(1, cfg.train.grad_accum)
                    n, p = max_micro_batch(cfg, replace(base, grad_accum=accum), args.gpu_mem,
                                           limit=per_rank or 256, **{k2: v for k2, v in kw.items() if k2 != "capacity_gib"})
                    best.append((base, n, p, per_rank))
    print(format_sweep(plans))
    if best:
        print("\nlargest micro-batch that fits (gradients held across accumulation steps):")
        for base, n, p, per_rank in best:
            extra = "" if p is None else f" ({p.device_total / GiB:.1f} GiB)"
            use = ""
            if per_rank:
                d = max((k for k in range(1, n + 1) if per_rank % k == 0), default=0)
                use = (f"; with global batch {args.global_batch}: micro-batch {d} x {dp} dp x {per_rank // d} accumulation"
                       if d else "; does not fit at micro-batch 1")
            print(f"  {base.describe().replace(' mb1 x1', ''):<46s} max {n}{extra}{use}")
    return plans
