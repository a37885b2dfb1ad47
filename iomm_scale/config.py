"""The run config: typed dataclasses, loaded from YAML, overridden from the command line,
validated before anything is built.

    cfg = load_config("configs/tiny.yaml", ["train.steps=50", "optim.lr=3e-4"])

Every problem is reported as `ConfigError("<file>: <dotted.key>: <what is wrong>")`:
unknown keys, wrong types, impossible values, missing model paths. The generator section
is typed by its `family` (flux, s3dit, qwen_mmdit; see models/registry.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .flow import FlowConfig
from .models.attention import BACKENDS, AttentionBackendError, check_backend
from .models.conditioner import ConditionerConfig
from .models.registry import FAMILIES
from .models.vae import VAEConfig
from .parallel.config import ParallelConfig, model_info
from .train.evaluate import EvalConfig, config_errors as eval_config_errors


class ConfigError(ValueError):
    pass


@dataclass
class GeneratorSection:
    family: str = "flux"
    config: Any = None  # the family's config dataclass, built from the remaining keys
    path: str | None = None  # pretrained weights: a diffusers transformer directory or hub id (models/pretrained.py)
    subfolder: str | None = None  # e.g. "transformer" under a whole-pipeline directory / hub id


@dataclass
class ModelConfig:
    generator: GeneratorSection = field(default_factory=GeneratorSection)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    lora: Any = None  # models.lora.LoRAConfig when the section is given: LoRA on the generator, base frozen


@dataclass
class BuiltinDataConfig:
    """The built-in image set (no download): scikit-image's bundled photos as several crops each
    (image-only), plus procedural shapes with captions (text-image pairs)."""

    crops_per_photo: int = 4
    num_shapes: int = 64


@dataclass
class DataConfig:
    source: str = "builtin"  # "builtin" or "webdataset"
    resolution: int = 512
    batch_size: int = 8  # per device (micro-batch)
    image_only_fraction: float = 1.0  # lambda: 1.0 = image-only pre-training, 0.5 = the paper's mixed fine-tuning
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)
    webdataset: Any = None  # data.config.WebDatasetConfig when source == "webdataset"


@dataclass
class MuonSettings:
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    scaling: str = "match_rms_adamw"  # or "original"
    modulation: str = "muon"  # AdaLN modulation weights: "muon" or "adamw"
    ns_coefficients: str = "keller"  # quintic (3.4445, -4.7750, 2.0315) x 5, or "polar_express"
    ns_dtype: str = "auto"  # Newton-Schulz precision: "auto" (bf16 on GPU, fp32 on CPU), "bfloat16", "float32"
    per_head: bool = False  # also orthogonalise fused q|k|v per attention head
    implementation: str = "iomm"  # under launchers/: "iomm" (ZeRO-0) or "deepspeed" (ZeRO 1-3); docs/PARALLEL.md


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw" or "muon" (Muon for hidden matrices, AdamW for the rest)
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" or "cosine" (after warm-up)
    min_lr_ratio: float = 0.0
    ema_decay: float | None = None  # e.g. 0.999; None disables EMA
    muon: MuonSettings = field(default_factory=MuonSettings)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "iomm-scale"
    mode: str = "offline"  # "offline" works without network; "online" needs a login


@dataclass
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; CUDA only)
    compile: bool = False  # torch.compile each generator block (train/compile.py); static shapes
    compile_backend: str = "inductor"  # "inductor"; "aot_eager" / "aot_eager_decomp_partition" / "eager": no code generation
    compile_mllm: bool = False  # with compile: also each decoder layer of the frozen LLM (fixed condition length)
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 5  # steps in a row with a NaN / inf loss or gradient norm skipped before the run stops (0: stop at the first)
    resume: str = "auto"  # "auto" (latest in the run dir), "never", or a checkpoint directory
    resume_data_exact: bool = True  # false: a changed data setup restarts the stream at the saved epoch
    init_from: str | None = None  # stage 2: start from a checkpoint's weights (not its optimizer/step)
    init_from_ema: bool = True  # ... using its EMA weights when it has them
    num_samples: int = 8  # images in the final sample grid
    progress_bar: bool = True
    peak_tflops: float | None = None  # dense bf16 peak per device for MFU; None: profiling/mfu.py's table
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str | None = None  # default: runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # used by launchers/ (multi-process)
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out loss during training (train/evaluate.py)
    source: str = field(default="<defaults>", init=False)  # the file it came from (for messages), not a setting

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step: train.grad_accum or parallel.num_microbatches (the
        same thing under two names; validation refuses two different values)."""
        return max(self.train.grad_accum, self.parallel.num_microbatches)

    @property
    def generator(self):
        return self.model.generator.config

    def to_dict(self) -> dict:
        return to_dict(self)


# ----------------------------------------------------------------------------------------
# dict -> dataclass, with types checked
# ----------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key: str, errors: list):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list = []
            out = _coerce(value, arg, key, trial)
            if not trial:
                return out
        errors.append((key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}"))
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append((key, f"expected a mapping, got {value!r}"))
            return None
        return _build(tp, value, key, errors)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            errors.append((key, f"expected a list, got {value!r}"))
            return None
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            errors.append((key, f"expected true or false, got {value!r}"))
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append((key, f"expected a number, got {value!r}"))
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append((key, f"expected an integer, got {value!r}"))
        return value
    if tp is str:
        if not isinstance(value, str):
            errors.append((key, f"expected a string, got {value!r}"))
        return value
    return value


def _build(cls, data: dict, prefix: str, errors: list):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), sorted(names), n=1, cutoff=0.6) or \
                [n for n in sorted(names) if n.lower().startswith(str(k)[:3].lower())]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append((key, f"unknown key{hint}; valid keys: {', '.join(sorted(names))}"))
            continue
        kwargs[k] = _coerce(v, hints[k], key, errors)
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable after errors were recorded
        errors.append((prefix or "<root>", str(e)))
        return cls()


def _build_generator(data: dict, errors: list) -> GeneratorSection:
    data = dict(data or {})
    family = data.pop("family", "flux")
    path = _coerce(data.pop("path", None), str | None, "model.generator.path", errors)
    subfolder = _coerce(data.pop("subfolder", None), str | None, "model.generator.subfolder", errors)
    if family not in FAMILIES:
        errors.append(("model.generator.family", f"unknown family {family!r}; known: {', '.join(sorted(FAMILIES))}"))
        return GeneratorSection(family, None, path, subfolder)
    return GeneratorSection(family, _build(FAMILIES[family][0], data, "model.generator", errors), path, subfolder)


def _build_data_section(data: dict, errors: list) -> DataConfig:
    data = dict(data or {})
    wds = data.pop("webdataset", None)
    section = _build(DataConfig, data, "data", errors)
    if wds is not None:
        from .data.config import WebDatasetConfig

        if isinstance(wds, dict) and "image_only_fraction" in wds:
            # a saved config (to_dict) repeats data.image_only_fraction here: equal is fine
            if "image_only_fraction" not in data or wds["image_only_fraction"] != data["image_only_fraction"]:
                errors.append(("data.webdataset.image_only_fraction",
                               "set the mixture once, as data.image_only_fraction"))
            wds = {k: v for k, v in wds.items() if k != "image_only_fraction"}
        section.webdataset = _build(WebDatasetConfig, wds, "data.webdataset", errors)
        if isinstance(section.webdataset, WebDatasetConfig):
            section.webdataset.image_only_fraction = section.image_only_fraction  # one lambda for every source
    return section


def from_dict(raw: dict, source: str = "<dict>", world_size: int | None = None) -> RunConfig:
    errors: list[tuple[str, str]] = []
    raw = dict(raw or {})
    model = dict(raw.pop("model", {}) or {})
    generator = _build_generator(model.pop("generator", {}), errors)
    lora = model.pop("lora", None)
    if lora is not None:
        from .models.lora import LoRAConfig

        lora = _coerce(lora, LoRAConfig, "model.lora", errors)
    data = _build_data_section(raw.pop("data", {}), errors)
    cfg = _build(RunConfig, {**raw, "model": model}, "", errors)
    cfg.model.generator = generator
    cfg.model.lora = lora
    cfg.data = data
    cfg.source = source
    if not errors:
        errors = validate(cfg, world_size)
    if errors:
        raise ConfigError(format_errors(source, errors))
    return cfg


def format_errors(source: str, errors: list[tuple[str, str]]) -> str:
    lines = [f"{source}: {key}: {msg}" for key, msg in errors]
    return lines[0] if len(lines) == 1 else f"{len(lines)} problems in the config:\n  " + "\n  ".join(lines)


def validate(cfg: RunConfig, world_size: int | None = None) -> list[tuple[str, str]]:
    """Value checks across sections (types are already right); the parallel layout against the
    launch's `world_size` too when it is known (the launchers pass it)."""
    errors: list[tuple[str, str]] = []

    def sub(prefix, items):
        errors.extend((f"{prefix}.{k}", m) for k, m in items)

    gen = cfg.generator
    if gen is not None:
        sub("model.generator", gen.validate())
        backend = getattr(gen, "attention_backend", "auto")
        if backend not in BACKENDS:
            errors.append(("model.generator.attention_backend", f"must be one of {BACKENDS}, got {backend!r}"))
        elif backend == "flash":
            try:
                check_backend(backend)  # flash-attn importable and a CUDA device visible
            except AttentionBackendError as e:
                errors.append(("model.generator.attention_backend", str(e)))
        if cfg.model.generator.path is not None and not errors:
            from .models.pretrained import path_errors

            sub("model.generator", path_errors(cfg.model.generator.family, gen, cfg.model.generator.path,
                                               cfg.model.generator.subfolder))
    if cfg.model.lora is not None:
        lora_errors = cfg.model.lora.validate()
        if gen is not None and not lora_errors and not errors:
            from .models.lora import target_errors

            lora_errors = target_errors(cfg.model.lora, cfg.model.generator.family, gen)
        sub("model.lora", lora_errors)
    sub("model.conditioner", cfg.model.conditioner.validate())
    sub("model.vae", cfg.model.vae.validate())
    sub("flow", cfg.flow.validate())

    d = cfg.data
    if d.source not in ("builtin", "webdataset"):
        errors.append(("data.source", f"must be 'builtin' or 'webdataset', got {d.source!r}"))
    if d.source == "webdataset":
        if d.webdataset is None:
            errors.append(("data.webdataset", "missing: data.source is 'webdataset' but no data.webdataset section"))
        else:
            sub("data.webdataset", d.webdataset.validate())
    if d.batch_size < 1:
        errors.append(("data.batch_size", f"must be >= 1, got {d.batch_size}"))
    if not 0.0 <= d.image_only_fraction <= 1.0:
        errors.append(("data.image_only_fraction", f"must be in [0, 1], got {d.image_only_fraction}"))
    factor = cfg.model.vae.downsample_factor * getattr(gen, "latent_patch", 2)
    if d.resolution <= 0 or d.resolution % factor:
        errors.append(("data.resolution", f"must be a positive multiple of VAE factor x patch = {factor}, got {d.resolution}"))

    o = cfg.optim
    if o.name not in ("adamw", "muon"):
        errors.append(("optim.name", f"must be 'adamw' or 'muon', got {o.name!r}"))
    if not o.lr > 0:
        errors.append(("optim.lr", f"must be > 0, got {o.lr}"))
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        errors.append(("optim.betas", f"must be two numbers in [0, 1), got {o.betas}"))
    if not o.eps > 0:  # 0 would divide 0 by 0 for a parameter whose gradients are all zero
        errors.append(("optim.eps", f"must be > 0, got {o.eps}"))
    if o.weight_decay < 0:
        errors.append(("optim.weight_decay", f"must be >= 0, got {o.weight_decay}"))
    if o.grad_clip < 0:
        errors.append(("optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}"))
    if o.warmup_steps < 0:
        errors.append(("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}"))
    if o.schedule not in ("constant", "cosine"):
        errors.append(("optim.schedule", f"must be 'constant' or 'cosine', got {o.schedule!r}"))
    if o.ema_decay is not None and not 0.0 < o.ema_decay < 1.0:
        errors.append(("optim.ema_decay", f"must be in (0, 1) or null, got {o.ema_decay}"))
    if o.muon.scaling not in ("match_rms_adamw", "original"):
        errors.append(("optim.muon.scaling", f"must be 'match_rms_adamw' or 'original', got {o.muon.scaling!r}"))
    if o.muon.ns_coefficients not in ("keller", "polar_express"):
        errors.append(("optim.muon.ns_coefficients", f"must be 'keller' or 'polar_express', got {o.muon.ns_coefficients!r}"))
    if o.muon.ns_dtype not in ("auto", "bfloat16", "float32"):
        errors.append(("optim.muon.ns_dtype", f"must be auto, bfloat16 or float32, got {o.muon.ns_dtype!r}"))
    if o.muon.modulation not in ("muon", "adamw"):
        errors.append(("optim.muon.modulation", f"must be 'muon' or 'adamw', got {o.muon.modulation!r}"))
    if o.muon.implementation not in ("iomm", "deepspeed"):
        errors.append(("optim.muon.implementation", f"must be 'iomm' or 'deepspeed', got {o.muon.implementation!r}"))

    t = cfg.train
    p = cfg.parallel
    if p.num_microbatches > 1 and t.grad_accum > 1 and p.num_microbatches != t.grad_accum:
        errors.append(("parallel.num_microbatches", f"{p.num_microbatches} and train.grad_accum {t.grad_accum} both set "
                       "the micro-batches per optimizer step (the pipeline's 1F1B micro-batches are the same "
                       "thing): set one of them"))
    if gen is not None:  # the layout against the model's heads / blocks (and the launch's world size)
        effective = dataclasses.replace(p, num_microbatches=cfg.micro_batches)  # grad_accum feeds the pipeline too
        sub("parallel", effective.validate(world_size, model_info(gen)))

    if t.steps < 1:
        errors.append(("train.steps", f"must be >= 1, got {t.steps}"))
    if t.grad_accum < 1:
        errors.append(("train.grad_accum", f"must be >= 1, got {t.grad_accum}"))
    if t.device not in ("auto", "cpu", "cuda"):
        errors.append(("train.device", f"must be auto, cpu or cuda, got {t.device!r}"))
    if t.precision not in ("fp32", "bf16"):
        errors.append(("train.precision", f"must be fp32 or bf16, got {t.precision!r}"))
    from .train.compile import COMPILE_BACKENDS, compile_launch_errors

    if t.compile_backend not in COMPILE_BACKENDS:
        errors.append(("train.compile_backend", f"must be one of {COMPILE_BACKENDS}, got {t.compile_backend!r}"))
    errors.extend(compile_launch_errors(cfg))
    if t.compile_mllm and not t.compile:
        errors.append(("train.compile_mllm", "compiles the frozen LLM's layers only together with train.compile: true"))
    if t.log_every < 1:
        errors.append(("train.log_every", f"must be >= 1, got {t.log_every}"))
    if t.ckpt_every < 0:
        errors.append(("train.ckpt_every", f"must be >= 0 (0: only at the end), got {t.ckpt_every}"))
    if t.keep_checkpoints < 1:
        errors.append(("train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}"))
    if t.max_nonfinite_steps < 0:
        errors.append(("train.max_nonfinite_steps", f"must be >= 0 (0: stop at the first), got {t.max_nonfinite_steps}"))
    if t.wandb.mode not in ("offline", "online", "disabled"):
        errors.append(("train.wandb.mode", f"must be offline, online or disabled, got {t.wandb.mode!r}"))
    sub("eval", cfg.eval.validate())
    if not errors:
        errors.extend(eval_config_errors(cfg))
    return errors


# ----------------------------------------------------------------------------------------
# YAML and command-line overrides
# ----------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    if value == "":
        return key.split("."), ""
    try:
        return key.split("."), yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        hint = (" (quote list items holding braces: " + key + "='[\"data/img-{000000..000099}.tar\"]')"
                if "{" in value else "")
        raise ConfigError(f"override {key}: value {value!r} is not valid YAML: {problem}{hint}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                world_size: int | None = None) -> RunConfig:
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping")
    if overrides:
        source = f"{source} (with overrides {' '.join(overrides)})"
    return from_dict(apply_overrides(raw, overrides or []), source, world_size)


def to_dict(obj) -> Any:
    if isinstance(obj, GeneratorSection):
        where = {k: v for k, v in (("path", obj.path), ("subfolder", obj.subfolder)) if v is not None}
        return {"family": obj.family, **where, **to_dict(obj.config)}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "source"}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
