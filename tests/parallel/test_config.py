"""Layout validation before any process group exists (no processes launched)."""

import pytest
import torch

from iomm_scale.parallel.config import LayoutError, ModelInfo, ParallelConfig, check_batch, model_info, validate_layout


def keys(errors):
    return [k for k, _ in errors]


def flux_meta():
    from iomm_scale.models.flux_mmdit import FluxConfig, FluxMMDiT

    with torch.device("meta"):
        return FluxMMDiT(FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, num_heads=4, head_dim=16,
                                    context_dim=32, pooled_dim=32, axes_dims_rope=(4, 6, 6)))


def test_defaults_valid():
    assert ParallelConfig().validate(world_size=1) == []
    assert ParallelConfig(tp=2, pp=2, zero_stage=1, num_microbatches=4).validate(8, flux_meta()) == []


def test_world_not_divisible():
    e = ParallelConfig(tp=2, pp=2, zero_stage=1, num_microbatches=4).validate(world_size=6)
    assert "tp" in keys(e) and "not divisible by tp*pp" in e[0][1]


def test_zero23_with_pp_rejected_with_reason():
    for stage in (2, 3):
        e = ParallelConfig(pp=2, zero_stage=stage, num_microbatches=4).validate(2)
        msg = dict(e)["zero_stage"]
        assert f"ZeRO-{stage} cannot be combined with pipeline parallelism" in msg and "partition" in msg


def test_pp_needs_zero1_and_enough_microbatches():
    e = dict(ParallelConfig(pp=2, zero_stage=0, num_microbatches=4).validate(2))
    assert "engine.backward" in e["zero_stage"]
    e = dict(ParallelConfig(pp=4, zero_stage=1, num_microbatches=2).validate(4))
    assert "1F1B needs at least as many micro-batches as stages" in e["num_microbatches"]


def test_heads_and_widths_divisible_by_tp():
    e = ParallelConfig(tp=3).validate(3, flux_meta())
    msgs = " ".join(m for _, m in e)
    assert "4 attention heads are not divisible by tp=3" in msgs
    assert "does not divide the sharded widths" in msgs


def test_blocks_divisible_by_pp():
    e = dict(ParallelConfig(pp=3, zero_stage=1, num_microbatches=3).validate(3, flux_meta()))
    assert "4 blocks do not split evenly into pp=3" in e["pp"]
    e = dict(ParallelConfig(pp=8, zero_stage=1, num_microbatches=8).validate(8, ModelInfo(num_heads=4, num_blocks=4)))
    assert "only 4 blocks" in e["pp"]


def test_bad_values_and_offload():
    e = dict(ParallelConfig(tp=0, zero_stage=5, activation_checkpointing="some", offload_params=True,
                            offload_optimizer=True).validate())
    assert set(e) >= {"tp", "zero_stage", "activation_checkpointing", "offload_params", "offload_optimizer"}


def test_validate_layout_raises_clear_error():
    with pytest.raises(LayoutError, match="zero_stage: ZeRO-3 cannot be combined"):
        validate_layout(ParallelConfig(pp=2, zero_stage=3, num_microbatches=2), 2)


def test_from_dict_unknown_key():
    with pytest.raises(LayoutError, match="tensor_parallel: unknown key"):
        ParallelConfig.from_dict({"tensor_parallel": 2})


def test_model_info_from_meta_model_and_config():
    info = model_info(flux_meta())
    assert info.num_heads == 4 and info.num_blocks == 4
    assert info.sharded_widths["single_blocks.0.linear1"] == (64, 64, 64, 256)
    assert info.sharded_widths["single_blocks.0.linear2"] == (64, 256)
    cfg_info = model_info(flux_meta().cfg)
    assert cfg_info.num_heads == 4 and cfg_info.num_blocks == 4


def test_other_families_validate():
    from iomm_scale.models.qwen_mmdit import QwenMMDiT, QwenMMDiTConfig
    from iomm_scale.models.s3dit import S3DiT, S3DiTConfig

    with torch.device("meta"):
        s3 = S3DiT(S3DiTConfig(in_channels=4, num_layers=4, num_refiner_layers=1, num_heads=4, head_dim=16,
                               context_dim=32, axes_dims=(4, 6, 6)))
        qw = QwenMMDiT(QwenMMDiTConfig(in_channels=16, out_channels=4, num_layers=4, num_heads=4, head_dim=16,
                                       context_dim=32, axes_dims_rope=(4, 6, 6)))
    assert ParallelConfig(tp=2, pp=2, zero_stage=1, num_microbatches=4).validate(4, s3) == []  # 2 refiners + 4 layers = 6 blocks
    assert ParallelConfig(tp=4, pp=2, zero_stage=1, num_microbatches=2).validate(8, qw) == []
    assert "tp" in keys(ParallelConfig(tp=8).validate(8, qw))


def test_check_batch():
    assert check_batch(64, 4, 8) == 2
    with pytest.raises(LayoutError, match="train.global_batch: global batch 60"):
        check_batch(60, 4, 8)


def test_lora_with_tp_or_pp_is_refused_naming_the_keys():
    from iomm_scale.config import ConfigError
    from iomm_scale.parallel.dist_trainer import split_parallel_args

    with pytest.raises(ConfigError) as info:
        split_parallel_args("configs/tiny_qwen_lora.yaml", ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1",
                                                            "parallel.num_microbatches=4"])
    assert "parallel.tp" in str(info.value) and "parallel.pp" in str(info.value) and "LoRA" in str(info.value)
    split_parallel_args("configs/tiny_qwen_lora.yaml", ["parallel.zero_stage=3"])  # data parallel is fine
