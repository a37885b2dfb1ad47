"""LoRA on the generator (the Qwen-Image fine-tune: r = 64, alpha = 64, dropout 0), with peft.

    model:
      generator: {family: qwen_mmdit, path: /models/Qwen-Image/transformer, ...}   # frozen base
      lora: {r: 64, alpha: 64, dropout: 0.0}     # target_modules / init: defaults below

What trains: the LoRA factors (A, B) of the targeted generator linears, plus the IOMM-new
modules (RQA, condition RMSNorm + projection). Everything else of the generator (the base
weights, embedders, norms, AdaLN modulation, final layer) is frozen and stays bit-identical;
the MLLM and VAE are frozen as always.

Targets. Default: every attention and MLP linear of the transformer blocks, not the AdaLN
modulation (`profiling/flops.LORA_TARGETS`, the same list FLOPs and the memory planner count).
For Qwen-Image: img_qkv / txt_qkv (q|k|v fused, as our model stores them), img_out / txt_out,
img_mlp.fc1 / fc2, txt_mlp.fc1 / fc2. `target_modules` takes module names or dotted suffixes
(peft's list semantics: "img_qkv" matches every block's) or one regex string (full match).

Fused q|k|v. A LoRA on our fused projection is one rank-r adapter with a shared A and
B = [B_q; B_k; B_v]: delta W_q = B_q A and so on. It exports *exactly* to diffusers' separate
to_q / to_k / to_v (A repeated, B split). It is not the same parametrisation as three
independent rank-r adapters (diffusers' training scripts): fewer parameters (A is shared),
the same rank per projection.

Export (`export_lora`): `pytorch_lora_weights.safetensors` in diffusers' peft format
(`transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`, adapter metadata with r
and alpha), loadable by `QwenImagePipeline.load_lora_weights`; the RQA and projection go to
`iomm_conditioner.safetensors` beside it (the pipeline has no place for them: its
`prompt_embeds` come from our conditioner).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
CONDITIONER_WEIGHTS_NAME = "iomm_conditioner.safetensors"
INITS = ("gaussian", "kaiming")
BASE_DTYPES = ("float32", "bfloat16")
ADAPTER_NAME = "default"  # peft's
PIPELINES = {"qwen_mmdit": "QwenImagePipeline", "flux": "FluxPipeline", "s3dit": "ZImagePipeline"}


@dataclass
class LoRAConfig:
    r: int = 64
    alpha: float = 64.0  # scale alpha / r on B A
    dropout: float = 0.0
    target_modules: list[str] | str | None = None  # None: every attention + MLP linear of the blocks (see above)
    init: str = "gaussian"  # B = 0 either way; A ~ N(0, 1/r) ("gaussian", diffusers' LoRA scripts) or peft's kaiming-uniform
    # the frozen base's weights: "bfloat16" halves them (Qwen-Image: 82 -> 41 GB); the generator then runs
    # under bf16 autocast wherever it is called (training, sampling; CPU too); the adapters stay float32
    base_dtype: str = "float32"

    def validate(self) -> list[tuple[str, str]]:
        errors = []
        if self.r <= 0:
            errors.append(("r", f"must be > 0, got {self.r}"))
        if not self.alpha > 0:
            errors.append(("alpha", f"must be > 0, got {self.alpha}"))
        if not 0.0 <= self.dropout < 1.0:
            errors.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if self.init not in INITS:
            errors.append(("init", f"must be one of {INITS}, got {self.init!r}"))
        if self.base_dtype not in BASE_DTYPES:
            errors.append(("base_dtype", f"must be one of {BASE_DTYPES}, got {self.base_dtype!r}"))
        if isinstance(self.target_modules, list) and not self.target_modules:
            errors.append(("target_modules", "must not be empty (leave it out for the default)"))
        return errors


def default_targets(family: str) -> str:
    from ..profiling.flops import LORA_TARGETS

    return LORA_TARGETS[family]


def _linear_names(generator: nn.Module) -> list[str]:
    return [n for n, m in generator.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, target: str) -> bool:  # peft's list semantics
    return name == target or name.endswith("." + target)


def target_errors(cfg: LoRAConfig, family: str, gen_cfg) -> list[tuple[str, str]]:
    """Every target must name at least one linear layer of the generator (built on the meta
    device: no memory), and only linear layers."""
    from .registry import build_generator

    with torch.device("meta"):
        gen = build_generator(family, gen_cfg)
    linears = _linear_names(gen)
    modules = [n for n, _ in gen.named_modules() if n]
    block_linears = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in linears if re.search(r"\.\d+\.", n)})
    hint = f"; the {family} generator's block linears are: {', '.join(block_linears)}"
    t = cfg.target_modules
    errors = []
    if isinstance(t, str):
        try:
            pattern = re.compile(t)
        except re.error as e:
            return [("target_modules", f"not a valid regex: {e}")]
        if not any(pattern.fullmatch(n) for n in linears):
            errors.append(("target_modules", f"regex {t!r} matches no linear layer{hint}"))
        bad = [n for n in modules if pattern.fullmatch(n) and n not in linears]
        if bad:
            errors.append(("target_modules", f"regex {t!r} matches non-linear modules {bad[:3]}{hint}"))
    elif t is not None:
        for i, name in enumerate(t):
            if not any(_matches(n, name) for n in linears):
                errors.append((f"target_modules[{i}]", f"{name!r} matches no linear layer{hint}"))
            bad = [n for n in modules if _matches(n, name) and n not in linears]
            if bad:
                errors.append((f"target_modules[{i}]", f"{name!r} matches non-linear modules {bad[:3]}{hint}"))
    return errors


# ------------------------------------------------------------------------------------------
# applying
# ------------------------------------------------------------------------------------------
def apply_lora(generator: nn.Module, cfg: LoRAConfig, family: str) -> nn.Module:
    """Freeze the generator (cast to `base_dtype`) and inject LoRA adapters (peft, float32)
    into the targeted linears; only the adapters require grad. Uses the global RNG for A's
    init (build_iomm forks it)."""
    from peft import LoraConfig, inject_adapter_in_model

    generator.requires_grad_(False).to(getattr(torch, cfg.base_dtype))
    targets = cfg.target_modules if cfg.target_modules is not None else default_targets(family)
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          init_lora_weights="gaussian" if cfg.init == "gaussian" else True)
    generator = inject_adapter_in_model(peft_cfg, generator, adapter_name=ADAPTER_NAME)
    for name, p in generator.named_parameters():
        p.requires_grad_(".lora_" in name)
        if ".lora_" in name:
            p.data = p.data.float()
    if cfg.base_dtype != "float32":
        dtype = getattr(torch, cfg.base_dtype)
        for method in ("forward", "forward_tokens"):
            if hasattr(generator, method):
                setattr(generator, method, _under_autocast(generator, getattr(generator, method), dtype))
    return generator


def _under_autocast(module: nn.Module, fn, dtype: torch.dtype):
    """fn run under autocast to `dtype` on the module's device: a half-precision frozen base
    with float32 adapters and inputs. Outputs come back in `dtype` (callers upcast)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.autocast(next(module.parameters()).device.type, dtype=dtype):
            return fn(*args, **kwargs)

    return wrapped


def lora_modules(generator: nn.Module) -> dict[str, nn.Module]:
    """{our module name: peft LoRA layer} of every adapted linear."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in generator.named_modules() if isinstance(m, LoraLayer)}


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


@torch.no_grad()
def base_fingerprint(generator: nn.Module) -> str:
    """A checksum of the generator's frozen weights (everything but the LoRA factors): the
    trainer stores it in each checkpoint and refuses to resume adapters onto another base."""
    h = hashlib.sha256()
    for name, p in sorted(generator.state_dict().items()):
        if is_lora_param(name) or not torch.is_floating_point(p):
            continue
        x = p.detach().double()
        h.update(f"{name}:{tuple(p.shape)}:{x.sum().item():.10e}:{x.abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# exporting to diffusers
# ------------------------------------------------------------------------------------------
def _adapter(family: str):
    from .adapters import flux, qwen_image, zimage

    return {"flux": flux, "s3dit": zimage, "qwen_mmdit": qwen_image}[family]


def to_diffusers_lora(generator: nn.Module, family: str) -> tuple[dict[str, torch.Tensor], list[str], int, float]:
    """Our LoRA factors -> ({"<diffusers module>.lora_A.weight": A, ...}, diffusers module names,
    r, alpha). Fused projections split exactly: along the output (q|k|v) the B rows split and
    A is shared; along the input (row-fused) the A columns split and B is shared."""
    from .adapters.common import _fused_sizes

    maps = {m.ours: m for m in _adapter(family).key_maps(generator.cfg)}
    out, names, ranks, alphas = {}, [], set(), set()
    for name, layer in lora_modules(generator).items():
        a = layer.lora_A[ADAPTER_NAME].weight.detach()
        b = layer.lora_B[ADAPTER_NAME].weight.detach()
        ranks.add(layer.r[ADAPTER_NAME])
        alphas.add(float(layer.lora_alpha[ADAPTER_NAME]))
        m = maps.get(f"{name}.weight")
        if m is None:
            raise ValueError(f"{name}: no diffusers counterpart in the {family} adapter; cannot export its LoRA")
        theirs = [t.removesuffix(".weight") for t in m.theirs]
        if len(theirs) == 1:
            pieces = [(a, b)]
        elif m.dim == 0:
            sizes = _fused_sizes(m, layer.base_layer.weight)
            pieces = [(a, bb) for bb in torch.split(b, sizes, 0)]
        else:
            sizes = _fused_sizes(m, layer.base_layer.weight)
            pieces = [(aa, b) for aa in torch.split(a, sizes, 1)]
        for module, (pa, pb) in zip(theirs, pieces):
            out[f"{module}.lora_A.weight"] = pa.contiguous().clone()
            out[f"{module}.lora_B.weight"] = pb.contiguous().clone()
            names.append(module)
    if not out:
        raise ValueError("the generator has no LoRA adapters to export")
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"one rank and alpha per export, got ranks {ranks}, alphas {alphas}")
    return out, names, ranks.pop(), alphas.pop()


def save_diffusers_lora(generator: nn.Module, family: str, out_dir: str | os.PathLike,
                        dtype: torch.dtype | None = None) -> Path:
    """Write a LoRA generator's adapters as diffusers' `pytorch_lora_weights.safetensors`, through
    the family pipeline's own `save_lora_weights` with r / alpha metadata. Returns the directory."""
    import diffusers

    state, names, r, alpha = to_diffusers_lora(generator, family)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"r": r, "lora_alpha": alpha, "target_modules": sorted(set(names)), "lora_dropout": 0.0}
    pipeline = getattr(diffusers, PIPELINES[family])
    pipeline.save_lora_weights(out, transformer_lora_layers={k: v.cpu() for k, v in state.items()},
                               transformer_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHTS_NAME)
    return out


def export_lora(model: nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `model`'s (an IOMMModel) LoRA as diffusers' `pytorch_lora_weights.safetensors`
    (`save_diffusers_lora`) and the RQA + projection as `iomm_conditioner.safetensors`.
    Returns the directory."""
    family = model.cfg.model.generator.family
    out = save_diffusers_lora(model.generator, family, out_dir, dtype)
    save_conditioner(model, out / CONDITIONER_WEIGHTS_NAME)
    return out


def save_conditioner(model: nn.Module, path: str | os.PathLike) -> None:
    """The trained conditioner parts (RQA, projection norm and projection) of an IOMMModel as
    safetensors, with what a loader needs to rebuild them in the metadata."""
    from safetensors.torch import save_file

    cond = model.conditioner
    extra = {f"{prefix}.{k}": v.detach().cpu().contiguous() for prefix, mod in
             (("rqa", cond.rqa), ("proj_norm", cond.proj_norm), ("proj", cond.proj)) for k, v in mod.state_dict().items()}
    info = {"family": model.cfg.model.generator.family, "mllm_kind": cond.kind,
            "condition_positions": cond.cfg.condition_positions, "num_queries": str(cond.cfg.rqa.num_queries),
            "aux_prompt": cond.cfg.aux_prompt}
    save_file(extra, str(path), metadata={"format": "pt", "iomm": json.dumps(info)})


def export_trained(model: nn.Module, out_dir, ema=None) -> Path:
    """Export with the EMA weights when there are any (as sampling uses them), live otherwise."""
    backup = ema.swap_into(model) if ema is not None else None
    try:
        return export_lora(model, out_dir)
    finally:
        if backup is not None:
            ema.restore(model, backup)
