"""MFU arithmetic, the peak table, the trainer's throughput fields and iomm-profile on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from iomm_scale.profiling import mfu as U


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H800", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA H100 NVL", None),  # not in the table: no guess
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_lookup(name, peak):
    assert U.lookup_peak(name) == peak


def test_mfu_math():
    assert U.mfu(494.5, 989.0) == pytest.approx(0.5)
    assert U.mfu(100.0, None) is None
    assert U.peak_tflops_for("cpu") is None
    assert U.peak_tflops_for("cpu", override=123.0) == 123.0


def test_throughput_log_fields(tiny_cfg):
    from iomm_scale.profiling.flops import image_tokens, training_flops

    cfg = tiny_cfg("train.peak_tflops=100")
    log = U.ThroughputLog(cfg, torch.device("cpu"))
    out = log(2.0)
    assert out["image_tokens_per_s"] == pytest.approx(2.0 * image_tokens(cfg))
    assert out["tflops_per_device"] == pytest.approx(2.0 * training_flops(cfg)["total"] / 1e12)
    assert "mfu" not in out  # CPU: no MFU
    log.peak = 100.0  # as on a CUDA device with train.peak_tflops=100
    assert log(2.0)["mfu"] == pytest.approx(out["tflops_per_device"] / 100.0)


def test_trainer_logs_throughput(tiny_cfg, tmp_path):
    from iomm_scale.train.trainer import Trainer

    cfg = tiny_cfg("train.steps=2", "train.ckpt_every=0")
    trainer = Trainer(cfg, run_dir=tmp_path)
    trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert last["tflops_per_device"] > 0 and last["image_tokens_per_s"] > 0
    assert last["tflops_per_device"] == pytest.approx(last["samples_per_s"] * trainer.throughput.flops_per_sample / 1e12)
    assert "mfu" not in last


def test_profile_cli_cpu(tmp_path, tiny_cfg):
    from iomm_scale.profiling.profile import main

    csv_path = tmp_path / "p.csv"
    rows = main(["--config", "configs/tiny.yaml", "data.batch_size=2", "data.resolution=32", "--micro-batch", "2",
                 "--checkpointing", "none,full", "--attention", "sdpa,flash", "--steps", "1", "--warmup", "1",
                 "--csv", str(csv_path), "--threads", "1"])
    ok = [r for r in rows if r["status"].startswith("ok")]
    assert len(ok) == 2 and all(r["tflops_per_s"] > 0 and r["peak_mem_GiB"] > 0 for r in ok)
    assert any(r["status"].startswith("skipped") for r in rows)  # flash: no CUDA here
    assert csv_path.read_text().startswith("scope,micro_batch")
    assert "fwd_bwd_s,optimizer_s" in csv_path.read_text().splitlines()[0]
    for r in ok:  # one timed step: its two parts lie inside it
        assert 0 < r["fwd_bwd_s"] and 0 < r["optimizer_s"] and r["fwd_bwd_s"] + r["optimizer_s"] <= r["step_s"]
        assert r["mfu"] is None and r["mfu_fwd_bwd"] is None  # CPU: no MFU
    full = next(r for r in ok if r["checkpointing"] == "full")
    none = next(r for r in ok if r["checkpointing"] == "none")
    assert full["act_saved_GiB"] < none["act_saved_GiB"]
    # the FLOPs are the whole micro-batch's (2 samples), the rate is per timed step
    from iomm_scale.config import load_config
    from iomm_scale.profiling.flops import training_flops

    cfg = load_config("configs/tiny.yaml", ["data.batch_size=2", "data.resolution=32"])
    for r in ok:
        assert r["tflops_per_step"] == pytest.approx(training_flops(cfg, batch=2)["total"] / 1e12, rel=1e-9)
        assert r["tflops_per_s"] == pytest.approx(r["tflops_per_step"] / r["step_s"], rel=1e-9)


def _live_tensors() -> int:
    import gc
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("scope", ["generator", "step"])
def test_profile_case_frees_what_it_built(tiny_cfg, scope):
    """A case leaves no tensor behind (count_saved once leaked every graph it counted through an
    uncollectable autograd cycle, so later cases of one profile run measured the earlier ones'
    weights and optimizer state: on an H200 the second case's peak was 1.5-3x its own)."""
    from iomm_scale.profiling.profile import Case, run_case

    cfg = tiny_cfg("data.batch_size=2", "data.resolution=32")
    before = _live_tensors()
    for ckpt in ("none", "full"):
        row = run_case(cfg, Case(2, ckpt, "sdpa", False), scope=scope, steps=1, warmup=1, device="cpu", plan=False)
        assert row["status"] == "ok", row
        assert _live_tensors() == before, f"{scope}/{ckpt} left tensors alive"


def test_master_weight_adamw_is_adamw_on_an_fp32_copy():
    """`--params bf16`'s optimizer: AdamW on fp32 masters of bf16 parameters (their bf16 grads
    upcast), rounded back; after 3 steps the masters equal torch AdamW run in fp32 on the same
    gradients, and the parameters are those masters rounded to bf16."""
    from iomm_scale.profiling.profile import MasterWeightAdamW

    torch.manual_seed(0)
    ref = [torch.randn(5, 3).bfloat16().float().requires_grad_(), torch.randn(4).bfloat16().float().requires_grad_()]
    params = [p.detach().bfloat16().requires_grad_() for p in ref]
    opt = MasterWeightAdamW(params, lr=1e-2, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        grads = [torch.randn_like(p, dtype=torch.float32).bfloat16() for p in params]
        for p, r, g in zip(params, ref, grads):
            p.grad, r.grad = g.clone(), g.float()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in params)
    for p, m, r in zip(params, opt.master, ref):
        torch.testing.assert_close(m, r.detach(), rtol=0, atol=0)
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), r.detach().bfloat16())
    assert opt.param_groups is opt.inner.param_groups  # set_lr reaches the inner AdamW


def test_profile_bf16_parameters_generator_scope(tiny_cfg):
    """`--params bf16` times a generator held in bf16 (no autocast) and refuses the step scope."""
    from iomm_scale.profiling.profile import Case, run_case

    cfg = tiny_cfg("data.batch_size=2", "data.resolution=32")
    fp32 = run_case(cfg, Case(2, "none", "sdpa", False, "fp32"), scope="generator", steps=1, device="cpu", plan=False)
    bf16 = run_case(cfg, Case(2, "none", "sdpa", False, "bf16"), scope="generator", steps=1, device="cpu", plan=False)
    assert fp32["status"] == bf16["status"] == "ok" and bf16["params"] == "bf16"
    assert bf16["tflops_per_step"] == fp32["tflops_per_step"]  # same model FLOPs
    assert bf16["act_saved_GiB"] < fp32["act_saved_GiB"]  # activations saved in bf16
    step = run_case(cfg, Case(2, "none", "sdpa", False, "bf16"), scope="step", steps=1, device="cpu", plan=False)
    assert step["status"].startswith("skipped: params bf16")
