"""`train.init_from` sources: single-process checkpoints, EMA exports, layout-free copies."""

import pytest
import torch

from iomm_scale.iomm import build_iomm
from iomm_scale.train import checkpoint as ckpt


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_layout_free_copy_split_over_stages_starts_a_model(tiny_cfg, tmp_path):
    torch.manual_seed(1)
    source = _trainable(build_iomm(tiny_cfg()))
    ema = {n: v + 0.5 for n, v in source.items()}
    names = sorted(source)
    half = len(names) // 2
    for stage, part in enumerate((names[:half], names[half:])):  # as two pipeline stages write them
        torch.save({"params": {n: source[n] for n in part}, "ema": {n: ema[n] for n in part}},
                   tmp_path / f"full_pp{stage}.pt")
    torch.manual_seed(2)
    model = build_iomm(tiny_cfg())
    assert ckpt.apply_init_weights(model, tmp_path, use_ema=True) == f"{tmp_path} (EMA weights)"
    assert all(torch.equal(p, ema[n]) for n, p in _trainable(model).items())
    ckpt.apply_init_weights(model, tmp_path, use_ema=False)
    assert all(torch.equal(p, source[n]) for n, p in _trainable(model).items())


def test_bad_sources_are_named(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        ckpt.init_source(tmp_path / "nowhere")
    ds = tmp_path / "ds"
    (ds / "step_00000010").mkdir(parents=True)
    (ds / "latest").write_text("step_00000010")
    (ds / "step_00000010" / "mp_rank_00_model_states.pt").write_bytes(b"")
    for where in (ds, ds / "step_00000010"):
        with pytest.raises(ValueError, match="a DeepSpeed checkpoint.*<run_dir>/ema"):
            ckpt.init_source(where)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no state.pt .* and no full_pp"):
        ckpt.init_source(tmp_path / "empty")
    # a checkpoint of another model: the first mismatching parameter is named
    small = _trainable(build_iomm(tiny_cfg()))
    name = next(iter(small))
    small[name] = small[name][..., :1]
    torch.save({"model": small}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match=f"{name} has shape"):
        ckpt.apply_init_weights(build_iomm(tiny_cfg()), tmp_path / "state.pt", use_ema=True)


def test_single_process_checkpoint_live_or_ema_weights_and_its_frozen_parts(tiny_cfg, tmp_path):
    torch.manual_seed(3)
    source = build_iomm(tiny_cfg())
    live = _trainable(source)
    mllm = source.conditioner.mllm  # random-init frozen parts are saved with the run
    frozen = {"conditioner.mllm": {k: v + 1.0 for k, v in mllm.state_dict().items()}}
    torch.save({"model": live, "ema": {"decay": 0.9, "shadow": {n: v + 0.5 for n, v in live.items()}}, "frozen": frozen},
               tmp_path / "state.pt")
    for use_ema, shift in ((False, 0.0), (True, 0.5)):
        torch.manual_seed(4)
        model = build_iomm(tiny_cfg())
        ckpt.apply_init_weights(model, tmp_path, use_ema=use_ema)
        assert all(torch.equal(p, live[n] + shift) for n, p in _trainable(model).items())
        assert all(torch.equal(v, frozen["conditioner.mllm"][k]) for k, v in model.conditioner.mllm.state_dict().items())
