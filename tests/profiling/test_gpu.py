"""CUDA checks of the profiling tools (run by benchmarks/gpu_check.sh; skipped without CUDA).

* the analytic FLOPs against FlopCounterMode on the real CUDA attention kernels (bf16);
* the memory planner against torch.cuda.max_memory_allocated of the trainer's step in bf16
  autocast (precision "amp"), with and without activation checkpointing, eager and with
  inductor-compiled blocks;
* the trainer logs MFU on a device the peak table knows.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def test_flops_match_cuda_kernels():
    from iomm_scale.models.flux_mmdit import FluxConfig
    from iomm_scale.models.registry import build_generator
    from iomm_scale.profiling import flops as F

    cfg = FluxConfig(in_channels=64, num_layers=2, num_single_layers=2, num_heads=4, head_dim=64, context_dim=128,
                     pooled_dim=128, axes_dims_rope=(16, 24, 24), attention_backend="sdpa")
    gen = build_generator("flux", cfg).cuda().to(torch.bfloat16)
    latents = torch.randn(2, 16, 32, 32, device="cuda", dtype=torch.bfloat16)
    cond = torch.randn(2, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with F.flop_counter() as counter:
        gen(latents, torch.rand(2, device="cuda"), cond).float().pow(2).mean().backward()
    led = F.generator_flops("flux", cfg, 2, 32, 64, attention_backward=F.COUNTER_ATTENTION_BACKWARD)
    assert abs(led.total / counter.get_total_flops() - 1) < 0.05


def _gpu_cfg(family: str, batch: int):
    from _memory_cases import GENERATORS, make_cfg

    from iomm_scale.config import from_dict, to_dict

    raw = to_dict(make_cfg(family, batch=batch, resolution=256))
    g = dict(GENERATORS[family])
    g.update(num_heads=6, head_dim=128)
    g["axes_dims_rope" if "axes_dims_rope" in g else "axes_dims"] = [16, 56, 56]
    raw["model"]["generator"] = g
    raw["train"]["precision"] = "bf16"
    raw["train"]["device"] = "cuda"
    return from_dict(raw, f"gpu {family}")


@pytest.mark.parametrize("family, mode, compile", [("flux", "none", "off"), ("flux", "full", "off"),
                                                   ("qwen_mmdit", "full", "off"), ("flux", "none", "all"),
                                                   ("s3dit", "none", "on")])
def test_planner_matches_cuda_peak(family, mode, compile):
    """compile on / all: inductor's compiled blocks (/ + LLM layers); the planner traces them
    through the same partitioner (profiling/memory.py)."""
    from iomm_scale.profiling.profile import Case, run_case

    cfg = _gpu_cfg(family, batch=8)
    row = run_case(cfg, Case(8, mode, "sdpa", compile), scope="step", steps=1, warmup=1, device="cuda")
    assert row["status"] == "ok", row
    # the CUDA-event split of the one timed step lies inside its wall time
    assert 0 < row["fwd_bwd_s"] and 0 < row["optimizer_s"] and row["fwd_bwd_s"] + row["optimizer_s"] <= row["step_s"]
    if row["mfu"] is not None:  # a card in the peak table (H100 / H200 / A100 / H800)
        assert 0 < row["mfu"] < row["mfu_fwd_bwd"] < 1, row
    ratio = row["plan_GiB"] / row["peak_mem_GiB"]
    print(json.dumps({"family": family, "mode": mode, "compile": compile, "measured_GiB": row["peak_mem_GiB"],
                      "plan_GiB": row["plan_GiB"]}))
    assert abs(ratio - 1) < 0.15, row


def test_trainer_logs_mfu_on_cuda(tiny_cfg, tmp_path):
    from iomm_scale.profiling.mfu import lookup_peak
    from iomm_scale.train.trainer import Trainer

    cfg = tiny_cfg("train.steps=2", "train.device=cuda", "train.precision=bf16")
    Trainer(cfg, run_dir=tmp_path).fit()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["tflops_per_device"] > 0
    assert ("mfu" in last) == (lookup_peak(torch.cuda.get_device_name()) is not None)
