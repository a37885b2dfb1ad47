"""`iomm-profile`: step time, samples/s, TFLOP/s, MFU and peak memory over a sweep of
micro-batch x activation checkpointing x attention backend x torch.compile.

    iomm-profile --config configs/tiny.yaml --micro-batch 2,4 --checkpointing none,full \\
                 --attention sdpa,math --compile off --steps 3 --csv profile.csv
    iomm-profile --preset b --scope generator --micro-batch 8 --checkpointing full   # on a GPU

Scopes:
    step       the trainer's step without data loading: IOMMModel.loss (VAE, ViT, MIM, RQA,
               frozen LLM with gradients through it, DiT) + backward + grad clipping +
               optimizer step (+ EMA when configured), on a synthetic batch
    generator  the DiT alone: forward + backward + optimizer step on synthetic x_t and an
               RQA-shaped condition (what dominates; needs no MLLM or VAE weights)

Parameters (`--params`): `fp32` holds fp32 parameters and gradients, with bf16 autocast on
CUDA when train.precision is bf16 (iomm-train's single-process path); `bf16` (generator scope)
holds bf16 parameters and gradients and an fp32 master copy in the optimizer, the layout of
DeepSpeed's bf16 mode, which the launchers use for train.precision bf16 (Megatron's too):
forward and backward run without autocast's per-step weight casts.

Timing: `step_s` is the median wall time of a step; `fwd_bwd_s` the median time from its
start to the end of backward (CUDA events on the stream; on CPU the clock), the part the
model FLOPs count. `mfu` is the whole step's MFU, `mfu_fwd_bwd` (table: fbMFU%) that of
forward + backward alone, without clipping, optimizer, zero_grad and EMA (`optimizer_s`).

`--random-frozen` builds the frozen MLLM at its real size with random weights (from the
offline config table in profiling/flops.py) and feeds latents + vision features as
feature shards would, so a full IOMM step can be timed on a machine without the weights.

Peak memory: on CUDA torch.cuda.max_memory_allocated over the timed steps (absolute). On
CPU there is no allocator counter, so the process's peak resident set is used: glibc is
told to return every allocation of >= 64 KiB to the OS on free (mallopt M_MMAP_THRESHOLD /
M_TRIM_THRESHOLD), the kernel's peak-RSS mark is reset by writing "5" to
/proc/self/clear_refs before the timed steps, and the figure is VmHWM minus the resident
set measured before the case's model was built (after a warm-up that loaded every
library). So it counts parameters, optimizer state, activations and temporaries, but not
the Python runtime and libraries. `act_saved_GiB` is the exact byte count of the tensors
autograd saved for backward in one forward (torch.autograd.graph.saved_tensors_hooks,
distinct storages, parameters excluded); `plan_GiB` is profiling/memory.py's estimate for
the same case.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import itertools
import os
import sys
import time
from dataclasses import dataclass

import torch

from ..train.compile import COMPILE_MODES

PRESETS = ("tiny", "tiny_qwen_lora", "b", "b_finetune", "l", "xl", "qwen_image_lora")  # configs/<name>.yaml
PARAM_MODES = ("fp32", "bf16")
COLUMNS = ["scope", "micro_batch", "checkpointing", "attention", "compile", "params", "step_s", "step_min_s", "cpu_s",
           "fwd_bwd_s", "optimizer_s", "samples_per_s",
           "image_tokens_per_s", "tflops_per_step", "tflops_per_s", "mfu", "mfu_fwd_bwd", "peak_mem_GiB",
           "act_saved_GiB", "plan_GiB", "status"]


# ------------------------------------------------------------------------------------------
# memory probes
# ------------------------------------------------------------------------------------------
def release_freed_memory(precise: bool = True) -> bool:
    """precise: make glibc serve every block of >= 64 KiB with its own mmap and hand it back
    to the OS on free, so RSS follows what is live (every such allocation then costs a
    system call and page faults: steps run several times slower). precise=False: the fast
    setting for timing (blocks up to 32 MiB come from the reusable heap). Returns False where
    this is not glibc Linux."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    mmap_at, trim_at = (65536, 65536) if precise else (32 * 2**20, 128 * 2**20)
    return bool(libc.mallopt(m_mmap_threshold, mmap_at)) and bool(libc.mallopt(m_trim_threshold, trim_at))


def trim_freed_memory() -> None:
    """Return whole free pages inside glibc's heaps to the OS (malloc_trim), so that memory
    freed by an earlier case is not reused unseen by the next one."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss(trim: bool = True) -> int | None:
    """Resident set size now (after returning freed heap pages to the OS when `trim`)."""
    if trim:
        trim_freed_memory()
    return _status("VmRSS:")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    return _status("VmHWM:")


class PeakMemory:
    """Peak memory of a region: CUDA max allocated, or CPU peak RSS above `baseline`."""

    def __init__(self, device: torch.device, baseline: int | None = None):
        self.device, self.baseline = device, baseline
        self.peak: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            trim_freed_memory()  # freed heap pages back to the OS before the peak mark is reset
            self.ok = reset_peak_rss() and self.baseline is not None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = float(torch.cuda.max_memory_allocated())
        elif self.ok:
            self.peak = float(peak_rss() - self.baseline)
        return False


def count_saved(fn, exclude: set[int]) -> float:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs, those in
    `exclude` (parameter / buffer storages) left out."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            key = t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):
            return t
        if key not in exclude and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        # detached: the same storage stays alive (so no key is reused while counting), but an
        # op's saved *output* returned as itself would close a cycle (node -> output -> grad_fn
        # -> node) through C++ that Python's gc cannot see, and every graph of the case leaks
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return float(sum(seen.values()))


# ------------------------------------------------------------------------------------------
# building what a case runs
# ------------------------------------------------------------------------------------------
def load_preset_or_config(preset: str | None, config: str | None, overrides: list[str]):
    from ..config import load_config

    if config is None:
        if preset is None:
            raise SystemExit("give --config FILE or --preset NAME")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        config = os.path.join(root, "configs", f"{preset}.yaml")
        if not os.path.isfile(config):
            raise SystemExit(f"preset {preset!r}: {config} does not exist (yet); use --config")
    return load_config(config, overrides)


def _random_frozen_mllm(cfg, device, dtype):
    from ..models.tiny_mllm import build_tokenizer
    from .flops import mllm_spec
    from .memory import _mllm_on_meta

    spec = mllm_spec(cfg.model.conditioner.mllm)
    if spec.kind != "internvl":
        raise SystemExit(f"--random-frozen builds InternVL MLLMs only, not {spec.kind}")
    model = _mllm_on_meta(spec, dtype).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name, b in model.named_buffers():
            if "inv_freq" in name:  # recompute RoPE frequencies (to_empty left them uninitialised)
                dim = b.numel() * 2
                tc = model.config.text_config
                theta = (getattr(tc, "rope_parameters", None) or {}).get("rope_theta") or getattr(tc, "rope_theta", 1e6)
                b.copy_(1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)))
    model.requires_grad_(False).eval()
    return model, build_tokenizer(512)


def build_model(cfg, device, random_frozen: bool = False):
    from ..iomm import IOMMModel, build_iomm
    from ..models.conditioner import IOMMConditioner
    from ..models.registry import build_generator
    from ..models.vae import FrozenVAE, VAEConfig

    if not random_frozen:
        return build_iomm(cfg, device)
    mdtype = getattr(torch, cfg.model.conditioner.mllm.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        with torch.device(device):  # initialised where it runs (a 1.6B DiT initialises slowly on a CPU)
            generator = build_generator(cfg.model.generator.family, cfg.generator)
        mllm, tok = _random_frozen_mllm(cfg, device, mdtype)
        cond = IOMMConditioner(cfg.model.conditioner, mllm, tok, condition_dim=cfg.generator.context_dim)
        vae = FrozenVAE(VAEConfig(type="pixel", pixel_factor=1))  # unused: batches carry latents
        vae.latent_channels = cfg.generator.latent_channels
    return IOMMModel(cfg, generator, cond, vae).to(device)


def synthetic_batch(cfg, model, b: int, device, features: bool):
    from .flops import latent_hw

    res = cfg.data.resolution
    g = torch.Generator(device="cpu").manual_seed(0)
    if features:
        h, w = latent_hw(cfg)
        spec_tokens = model.conditioner.num_image_tokens
        return {"latents": torch.randn(b, cfg.generator.latent_channels, h, w, generator=g).to(device),
                "vision_features": (0.02 * torch.randn(b, spec_tokens, model.conditioner.hidden_size, generator=g)).to(
                    device, model.conditioner.mllm.dtype),
                "captions": [None] * b}
    return {"pixels": (torch.rand(b, 3, res, res, generator=g) * 2 - 1).to(device), "captions": [None] * b}


def set_attention_backend(module: torch.nn.Module, backend: str) -> int:
    n = 0
    for m in module.modules():
        if hasattr(m, "backend") and isinstance(getattr(m, "backend"), str):
            m.backend = backend
            n += 1
    return n


def apply_checkpointing(generator: torch.nn.Module, mode: str, every_k: int = 2) -> None:
    try:
        from ..parallel.checkpointing import apply_activation_checkpointing
    except ImportError:  # parallel/ absent: torch.utils.checkpoint per block
        from torch.utils.checkpoint import checkpoint

        blocks = generator.blocks()
        chosen = range(len(blocks)) if mode == "full" else (range(0, len(blocks), every_k) if mode == "every_k" else [])
        for i in chosen:
            original = blocks[i].forward
            blocks[i].forward = lambda *a, _f=original, **k: checkpoint(_f, *a, use_reentrant=False, **k)
        return
    apply_activation_checkpointing(generator, mode, every_k)


class MasterWeightAdamW:
    """The optimizer side of DeepSpeed's bf16 mode, for timing `--params bf16`: the model holds
    bf16 parameters and gradients; AdamW updates an fp32 master copy (the gradients upcast),
    which is then rounded back into the bf16 parameters. `param_groups` is the inner AdamW's, so
    set_lr applies."""

    def __init__(self, params, **adamw_kw):
        from ..optim.builder import fused_adamw_ok

        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float() for p in self.params]  # a copy: the parameters are bf16
        self.inner = torch.optim.AdamW(self.master, fused=fused_adamw_ok(self.master), **adamw_kw)
        self.param_groups = self.inner.param_groups

    def step(self) -> None:
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for t in (*self.params, *self.master):
            t.grad = None


# ------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------
@dataclass
class Case:
    micro_batch: int
    checkpointing: str
    attention: str
    compile: bool | str  # off / False; on / True: generator blocks; all: + the frozen MLLM's decoder layers
    params: str = "fp32"  # fp32 (+ autocast when train.precision is bf16 on CUDA) or bf16 (+ fp32 master)

    @property
    def compile_mode(self) -> str:
        return {False: "off", True: "on"}.get(self.compile, self.compile)


def run_case(cfg, case: Case, *, scope: str = "step", steps: int = 3, warmup: int = 1, device=None,
             random_frozen: bool = False, peak_tflops: float | None = None, baseline: int | None = None,
             plan: bool = True) -> dict:
    from ..models.attention import check_backend
    from ..optim.builder import EMA, build_optimizer, fused_adamw_ok, set_lr
    from .flops import image_tokens, training_flops
    from .mfu import mfu as mfu_of, peak_tflops_for

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    row = {"scope": scope, "micro_batch": case.micro_batch, "checkpointing": case.checkpointing,
           "attention": case.attention, "compile": case.compile_mode, "params": case.params}
    try:
        check_backend(case.attention)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": f"skipped: {e}".split(". ")[0]}
    if case.compile_mode not in COMPILE_MODES:
        return {**row, "status": f"skipped: compile must be off, on or all, got {case.compile!r}"}
    if case.params not in PARAM_MODES:
        return {**row, "status": f"skipped: params must be fp32 or bf16, got {case.params!r}"}
    if case.params == "bf16" and scope != "generator":
        return {**row, "status": "skipped: params bf16 is timed for --scope generator only"}
    bf16 = cfg.train.precision == "bf16" and device.type == "cuda" and case.params == "fp32"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base = rss() if baseline is None else baseline
    features = random_frozen
    b = case.micro_batch
    if scope == "generator":  # the DiT alone: no MLLM / VAE is built (no weights needed)
        from ..models.registry import build_generator
        from .flops import condition_lengths, generator_flops, latent_hw

        with torch.random.fork_rng(devices=[]), torch.device(device):  # initialised where it runs
            torch.manual_seed(cfg.train.seed)
            generator = build_generator(cfg.model.generator.family, cfg.generator).train()
        if case.params == "bf16":
            generator.to(torch.bfloat16)
        model = torch.nn.Module()
        model.generator = generator
    else:
        model = build_model(cfg, device, random_frozen).train()
    set_attention_backend(model.generator, case.attention)
    apply_checkpointing(model.generator, case.checkpointing)
    if case.compile_mode != "off":  # as train.compile does; a fresh dynamo cache per case (static shapes)
        from torch import _dynamo  # (not `import torch._dynamo`: that would make `torch` local here)

        from ..train.compile import compile_blocks, compile_frozen_mllm

        _dynamo.reset()
        compile_blocks(model.generator)
        if case.compile_mode == "all" and scope != "generator":
            compile_frozen_mllm(model.conditioner)
    if scope == "generator":
        params = [p for p in model.generator.parameters() if p.requires_grad]
        if case.params == "bf16":
            opt = MasterWeightAdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        else:
            opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                    fused=fused_adamw_ok(params))
        ema = None
        cond_len = condition_lengths(cfg)["generator"]
        h, w = latent_hw(cfg)
        g = torch.Generator(device="cpu").manual_seed(0)
        dt = next(model.generator.parameters()).dtype
        x_t = torch.randn(b, cfg.generator.latent_channels, h, w, generator=g).to(device, dt)
        cond = torch.randn(b, cond_len, cfg.generator.context_dim, generator=g).to(device, dt)
        target = torch.randn_like(x_t)
        t = torch.rand(b, generator=g).to(device)
        flops = generator_flops(cfg.model.generator.family, cfg.generator, b, (h, w), cond_len, cond_grad=False).total

        def loss_fn():
            with autocast:
                out = model.generator(x_t, t, cond)
            return torch.nn.functional.mse_loss(out.float(), target.float())
    else:
        opt = build_optimizer(model, cfg)
        ema = EMA(model.trainable_state_dict(), cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        params = model.trainable_parameters()
        batch = synthetic_batch(cfg, model, b, device, features)
        flops = training_flops(cfg, batch=b, precomputed=features)["total"]

        def loss_fn():
            with autocast:
                return model.loss(batch)

    marks: list = []  # per timed step: (start, after backward, end), CUDA events or CPU clocks

    def mark():
        if device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def step(i: int, timed: bool = False):
        if timed:
            marks.append([mark()])
        loss = loss_fn()
        loss.backward()
        if timed:
            marks[-1].append(mark())
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        set_lr(opt, i, cfg)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model.trainable_state_dict())
        if timed:
            marks[-1].append(mark())

    try:
        cpu = device.type == "cpu"
        for i in range(warmup):
            step(i)
        if cpu:  # peak RSS first, with the precise allocator setting and a clean heap, untimed
            release_freed_memory(precise=True)
            with PeakMemory(device, base) as pm:
                step(warmup)
            warmup += 1
            release_freed_memory(precise=False)  # then time with the fast setting
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        with contextlib.ExitStack() as stack:
            if not cpu:
                pm = stack.enter_context(PeakMemory(device, base))
            cpu_times = []
            for i in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                step(warmup + i, timed=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        if cpu:
            release_freed_memory(precise=True)
        from .activation_trace import _storage_keys

        saved = count_saved(loss_fn, _storage_keys(model))
    except Exception as e:  # noqa: BLE001 - out of memory, or a compiler error: record it, go on with the next case
        model = opt = params = ema = None  # noqa: F841 - drop the closures' references before the next case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if isinstance(e, torch.OutOfMemoryError):
            return {**row, "status": "out of memory"}
        return {**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]}
    step_s = sorted(times)[len(times) // 2]
    row.update(step_min_s=min(times), cpu_s=sorted(cpu_times)[len(cpu_times) // 2])
    # The step split at the end of backward: forward + backward (what the model FLOPs count)
    # and the rest (clipping, optimizer, zero_grad, EMA). On CUDA from events on the stream.
    if device.type == "cuda":
        splits = [(a.elapsed_time(m) / 1e3, m.elapsed_time(z) / 1e3) for a, m, z in marks]
    else:
        splits = [(m - a, z - m) for a, m, z in marks]
    fwd_bwd_s = sorted(f for f, _ in splits)[len(splits) // 2]
    row.update(fwd_bwd_s=fwd_bwd_s, optimizer_s=sorted(o for _, o in splits)[len(splits) // 2])
    peak = peak_tflops if peak_tflops else (peak_tflops_for(device) if device.type == "cuda" else None)
    achieved = flops / step_s / 1e12
    row.update(step_s=step_s, samples_per_s=b / step_s, image_tokens_per_s=b * image_tokens(cfg) / step_s,
               tflops_per_step=flops / 1e12, tflops_per_s=achieved,
               mfu=mfu_of(achieved, peak) if peak else None,
               mfu_fwd_bwd=mfu_of(flops / fwd_bwd_s / 1e12, peak) if peak else None,
               peak_mem_GiB=None if pm.peak is None else pm.peak / 2**30, act_saved_GiB=saved / 2**30, status="ok")
    model = opt = None  # free them now (the closures above hold the same cells)
    if plan and scope == "step":
        try:
            from .memory import Layout, plan_memory

            p = plan_memory(cfg, Layout(micro_batch=b, checkpointing=case.checkpointing, compile=case.compile_mode),
                            device=device.type, precision=None if device.type == "cuda" else "fp32")
            row["plan_GiB"] = p.allocated / 2**30
        except Exception as e:  # noqa: BLE001 - the estimate is a convenience column
            row["plan_GiB"] = None
            row["status"] = f"ok (plan failed: {type(e).__name__})"
    return row


def warm_up(cfg, scope: str, random_frozen: bool) -> None:
    run_case(cfg, Case(1, "none", "sdpa", False), scope=scope, steps=1, warmup=0, device="cpu",
             random_frozen=random_frozen, plan=False)
    gc.collect()


def sweep(cfg, micro_batches, checkpointing, attention, compile_modes, params=("fp32",), **kw) -> list[dict]:
    rows = []
    for mb, ck, at, co, pa in itertools.product(micro_batches, checkpointing, attention, compile_modes, params):
        rows.append(run_case(cfg, Case(mb, ck, at, co, pa), **kw))
        print(format_row(rows[-1]), flush=True)
    return rows


def _fmt(v, spec):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def format_row(r: dict) -> str:
    return (f"{r['scope']:<9s} {r['micro_batch']:>4d} {r['checkpointing']:<7s} {r['attention']:<6s} {r['compile']:<4s} "
            f"{r.get('params', 'fp32'):<6s} "
            f"{_fmt(r.get('step_s'), '9.4f')} {_fmt(r.get('fwd_bwd_s'), '9.4f')} {_fmt(r.get('samples_per_s'), '10.2f')} "
            f"{_fmt(r.get('image_tokens_per_s'), '12.0f')} {_fmt(r.get('tflops_per_s'), '9.4g')} "
            f"{_fmt(None if r.get('mfu') is None else 100 * r['mfu'], '6.1f')} "
            f"{_fmt(None if r.get('mfu_fwd_bwd') is None else 100 * r['mfu_fwd_bwd'], '6.1f')} "
            f"{_fmt(r.get('peak_mem_GiB'), '9.3f')} "
            f"{_fmt(r.get('act_saved_GiB'), '9.3f')} {_fmt(r.get('plan_GiB'), '8.3f')}  {r.get('status', '')}")


HEADER = (f"{'scope':<9s} {'mb':>4s} {'ckpt':<7s} {'attn':<6s} {'comp':<4s} {'params':<6s} {'step_s':>9s} {'fwd_bwd_s':>9s} "
          f"{'samples/s':>10s} {'img_tok/s':>12s} {'TFLOP/s':>9s} {'MFU%':>6s} {'fbMFU%':>6s} {'peak_GiB':>9s} "
          f"{'saved_GiB':>9s} {'plan_GiB':>8s}  status")


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER, *map(format_row, rows)])


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})


def _csv_list(text: str, conv=str):
    return [conv(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="iomm-profile", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--preset", choices=PRESETS, help="configs/<preset>.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--scope", choices=("step", "generator"), default="step")
    parser.add_argument("--micro-batch", default=None, help="comma list (default: data.batch_size)")
    parser.add_argument("--checkpointing", default="none,full", help="comma list of none,full,every_k")
    parser.add_argument("--attention", default="sdpa", help="comma list of sdpa,math,flash (flash skipped when absent)")
    parser.add_argument("--compile", default="off",
                        help="comma list of off,on,all (on: generator blocks; all: also the frozen MLLM's layers)")
    parser.add_argument("--params", default="fp32",
                        help="comma list of fp32,bf16 (bf16: bf16 parameters + fp32 master, generator scope)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--random-frozen", action="store_true",
                        help="random MLLM at its real size + precomputed-feature batches (no weights needed)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 dense peak")
    parser.add_argument("--csv", default=None, help="write the table as CSV here")
    parser.add_argument("--no-plan", action="store_true", help="skip the memory planner's column")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    release_freed_memory()
    from ..config import ConfigError

    try:
        cfg = load_preset_or_config(args.preset, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    compile_modes = _csv_list(args.compile)
    if set(compile_modes) - set(COMPILE_MODES):
        parser.error(f"--compile takes off, on, all; got {args.compile!r}")
    param_modes = _csv_list(args.params)
    if set(param_modes) - set(PARAM_MODES):
        parser.error(f"--params takes fp32, bf16; got {args.params!r}")
    bad = [c for c in _csv_list(args.checkpointing) if c not in ("none", "full", "every_k")]
    if bad:
        parser.error(f"--checkpointing takes none, full, every_k; got {bad[0]!r}")
    try:
        mbs_checked = _csv_list(args.micro_batch, int) if args.micro_batch else []
    except ValueError:
        parser.error(f"--micro-batch takes a comma list of integers; got {args.micro_batch!r}")
    if any(m < 1 for m in mbs_checked):
        parser.error(f"--micro-batch: every value must be >= 1; got {args.micro_batch!r}")
    mbs = mbs_checked or [cfg.data.batch_size]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # load every library a case touches before the first RSS baseline
        warm_up(cfg, args.scope, args.random_frozen)

    print(f"iomm-profile: {cfg.source}, scope {args.scope}, device "
          f"{args.device or ('cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')}, "
          f"threads {torch.get_num_threads()}")
    print(HEADER, flush=True)
    try:
        rows = sweep(cfg, mbs, _csv_list(args.checkpointing), _csv_list(args.attention), compile_modes, param_modes,
                     scope=args.scope, steps=args.steps, warmup=args.warmup, device=args.device,
                     random_frozen=args.random_frozen, peak_tflops=args.peak_tflops, plan=not args.no_plan)
    finally:
        release_freed_memory(precise=False)  # leave the process with a fast allocator setting
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return rows


def cli(argv=None) -> None:
    """The `iomm-profile` console script: exit status 1 when a case failed with an error (out of
    memory and skipped backends are results, not errors), 0 otherwise."""
    rows = main(argv)
    if any(str(r.get("status", "")).startswith("error") for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    cli(sys.argv[1:])
