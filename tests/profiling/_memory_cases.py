"""Small CPU training configs for the memory-planner check: the three generator families,
hidden 192, the tiny MLLM, the pixel VAE at 128 px (256 image tokens), micro-batch 4."""

from __future__ import annotations

import os
import subprocess

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

GENERATORS = {
    "flux": dict(family="flux", in_channels=192, num_layers=2, num_single_layers=2, num_heads=4, head_dim=48,
                 context_dim=64, pooled_dim=64, axes_dims_rope=[8, 20, 20], attention_backend="sdpa"),
    "s3dit": dict(family="s3dit", in_channels=48, patch_size=2, num_layers=3, num_refiner_layers=1, num_heads=4,
                  head_dim=48, context_dim=64, axes_dims=[8, 20, 20], axes_lens=[256, 64, 64], attention_backend="sdpa"),
    "qwen_mmdit": dict(family="qwen_mmdit", in_channels=192, out_channels=48, patch_size=2, num_layers=3, num_heads=4,
                       head_dim=48, context_dim=64, axes_dims_rope=[8, 20, 20], attention_backend="sdpa"),
}


def make_cfg(family: str, batch: int = 4, resolution: int = 128):
    from iomm_scale.config import from_dict

    raw = yaml.safe_load(open(TINY))
    raw["model"]["generator"] = dict(GENERATORS[family])
    raw["data"].update(batch_size=batch, resolution=resolution, builtin={"crops_per_photo": 1, "num_shapes": 1})
    raw["train"].update(progress_bar=False, num_samples=0, resume="never", log_every=1)
    return from_dict(raw, f"tiny.yaml with a {family} generator")


# ZeRO-3 across 2 processes (tests/profiling/test_memory_zero3.py, _measure_memory_zero3.py):
# a FLUX generator at hidden 256 (2 double + 2 single blocks, 7.2M trainable parameters with the
# RQA), so that the partitioned parameters, gradients, AdamW states and DeepSpeed's buffers are
# most of each rank's peak.
ZERO3_GENERATOR = dict(family="flux", in_channels=192, num_layers=2, num_single_layers=2, num_heads=4, head_dim=64,
                       context_dim=64, pooled_dim=64, axes_dims_rope=[8, 28, 28], attention_backend="sdpa")
ZERO3_MICRO_BATCH = 2  # per rank
ZERO3_DP = 2
# The "+small" variant: DeepSpeed's ZeRO-3 buffers below the model's size (elements);
# DeepSpeed config key -> plan_memory argument
SMALL_BUFFERS = {"stage3_max_live_parameters": ("max_live_parameters", 3_000_000),
                 "stage3_max_reuse_distance": ("max_reuse_distance", 2_000_000),
                 "stage3_prefetch_bucket_size": ("prefetch_bucket", 1_000_000),
                 "reduce_bucket_size": ("reduce_bucket", 2_000_000)}


def make_zero3_cfg(batch: int = ZERO3_MICRO_BATCH, resolution: int = 128):
    from iomm_scale.config import from_dict

    raw = yaml.safe_load(open(TINY))
    raw["model"]["generator"] = dict(ZERO3_GENERATOR)
    raw["data"].update(batch_size=batch, resolution=resolution, builtin={"crops_per_photo": 1, "num_shapes": 1})
    raw["train"].update(progress_bar=False, num_samples=0, resume="never", log_every=1)
    return from_dict(raw, "tiny.yaml with a FLUX hidden-256 generator (ZeRO-3 memory case)")


def start_zero3(out_path: str, modes) -> "subprocess.Popen":
    """Start the 2-process ZeRO-3 measurement (_measure_memory_zero3.py) under torchrun; the
    caller may compute its plans meanwhile, then call `zero3_results`."""
    import socket
    import sys

    with socket.socket() as sock:  # a free port (other launches may run beside this one)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false", "TORCH_COMPILE_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ZERO3_DP), "--master_port",
           str(port), os.path.join(here, "_measure_memory_zero3.py"), out_path, *modes]
    log = open(out_path + ".log", "w")  # a file, not a pipe: nobody reads while the plans are computed
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def zero3_results(proc, out_path: str, timeout: float = 600) -> list[dict]:
    """One row per (checkpointing mode, rank): peak and static bytes, DeepSpeed's settings."""
    import json

    try:
        proc.wait(timeout=timeout)
    except BaseException:
        _stop(proc)
        raise
    if proc.returncode != 0 or not os.path.exists(out_path):
        with open(out_path + ".log") as f:
            raise RuntimeError(f"ZeRO-3 memory launch failed (exit {proc.returncode}):\n{f.read()[-5000:]}")
    with open(out_path) as f:
        return json.load(f)


def zero3_plan(mode: str, _cache: dict | None = None, deepspeed: dict | None = None, **layout):
    """The planner for the ZeRO-3 case (or, with `layout` overrides, another layout of it):
    fp32, no EMA (the distributed loop keeps none), device "cpu" (RSS counts touched pages);
    `deepspeed`: plan_memory's DeepSpeed settings (e.g. dict(SMALL_BUFFERS.values()))."""
    from iomm_scale.profiling.memory import Layout, plan_memory

    cfg = make_zero3_cfg()
    kw = dict(dp=ZERO3_DP, zero_stage=3, micro_batch=cfg.data.batch_size, checkpointing=mode)
    kw.update(layout)
    return plan_memory(cfg, Layout(**kw), precision="fp32", ema=False, device="cpu", _cache=_cache,
                       **(deepspeed or {}))


def zero3_plans_while_running(proc, make_plans):
    """`make_plans()` while the launch runs; the launch is stopped if it raises."""
    try:
        return make_plans()
    except BaseException:
        _stop(proc)
        raise


def _stop(proc) -> None:
    """SIGTERM first: torchrun forwards it to its workers (SIGKILL would orphan them)."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
