"""Muon under the launchers: which layouts / settings are accepted, and the messages for the rest
(no processes; the multi-process proofs are in test_dist.py, docs/PARALLEL.md "Muon under the
launchers")."""

import os
import subprocess
import sys

import pytest

from iomm_scale.config import ConfigError, load_config
from iomm_scale.parallel.config import ParallelConfig
from iomm_scale.parallel.dist_trainer import (deepspeed_muon_extra, muon_launch_errors, optimizer_factory,
                                              precision_extra, split_parallel_args)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
DS_OK = ["optim.name=muon", "optim.muon.implementation=deepspeed", "optim.grad_clip=0", "optim.muon.scaling=original"]


def keys(overrides, **layout):
    return [k for k, _ in muon_launch_errors(load_config(TINY, overrides), ParallelConfig(**layout))]


def test_adamw_is_never_affected():
    assert keys([], zero_stage=3, pp=2) == []


def test_iomm_muon_needs_zero0_and_no_pipeline():
    assert keys(["optim.name=muon"], zero_stage=0, tp=2) == []
    assert keys(["optim.name=muon"], zero_stage=1) == ["optim.muon.implementation"]
    assert keys(["optim.name=muon"], zero_stage=1, pp=2, num_microbatches=2) == ["parallel.pp"]
    (_, msg), = muon_launch_errors(load_config(TINY, ["optim.name=muon"]), ParallelConfig(zero_stage=3))
    assert "flat 1-D partitions" in msg and "zero_stage: 0" in msg and "implementation: deepspeed" in msg


def test_deepspeed_muon_settings():
    assert keys(DS_OK, zero_stage=3) == [] and keys(DS_OK, zero_stage=1) == []
    assert keys(DS_OK, zero_stage=0) == ["parallel.zero_stage"]
    assert keys(DS_OK, zero_stage=3, tp=2) == ["parallel.tp"]
    assert keys(["optim.name=muon", "optim.muon.implementation=deepspeed"], zero_stage=3) == \
        ["optim.grad_clip", "optim.muon.scaling"]
    assert keys([*DS_OK, "optim.muon.modulation=adamw"], zero_stage=3) == ["optim.muon.modulation"]
    cfg = load_config(TINY, [*DS_OK, "optim.lr=0.02"])
    extra = deepspeed_muon_extra(cfg)
    assert extra["zero_optimization"] == {"reduce_scatter": False}
    params = extra["optimizer"]["params"]
    assert extra["optimizer"]["type"] == "muon" and params["muon_lr"] == params["adam_lr"] == 0.02
    assert optimizer_factory(cfg) is None  # DeepSpeed builds it from the config entry


def test_precision_and_factory():
    cfg = load_config(TINY, ["optim.name=muon", "train.precision=bf16"])
    assert precision_extra(cfg, ParallelConfig()) == {"bf16": {"enabled": False},
                                                      "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    assert getattr(optimizer_factory(cfg), "wants_module", False)
    adamw = load_config(TINY, ["train.precision=bf16"])
    assert precision_extra(adamw, ParallelConfig()) == {"bf16": {"enabled": True, "check_grad_overflow": True}}


def test_bad_implementation_value_and_layout_are_config_errors():
    with pytest.raises(ConfigError, match="optim.muon.implementation: must be 'iomm' or 'deepspeed'"):
        load_config(TINY, ["optim.muon.implementation=megatron"])
    with pytest.raises(ConfigError, match="tiny.yaml.*optim.muon.implementation: 'iomm' Muon needs"):
        split_parallel_args(TINY, ["optim.name=muon", "parallel.zero_stage=1"])


def test_xl_preset_runs_muon_on_64_gpus():
    import torch

    from iomm_scale.models.registry import build_generator
    from iomm_scale.parallel.config import model_info, validate_layout

    cfg, pcfg = split_parallel_args(os.path.join(ROOT, "configs", "xl.yaml"), [])
    assert cfg.optim.name == "muon" and pcfg.zero_stage == 0 and pcfg.tp > 1
    with torch.device("meta"):
        gen = build_generator(cfg.model.generator.family, cfg.model.generator.config)
    validate_layout(pcfg, 64, model_info(gen))
    dp = 64 // (pcfg.tp * pcfg.pp)
    assert cfg.data.batch_size * cfg.train.grad_accum * dp == 4096  # the paper's global batch


def test_launcher_refuses_muon_under_zero1_with_the_key():
    p = subprocess.run([sys.executable, "launchers/pretrain.py", "--config", "configs/tiny.yaml", "optim.name=muon",
                        "parallel.zero_stage=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "configs/tiny.yaml" in p.stderr and "optim.muon.implementation" in p.stderr
