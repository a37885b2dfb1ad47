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
        torch.save({"params": {n: source[n] for n in part}, "ema": {n: ema[n] for n in part}, "iomm_step": 7,
                    "layout": {"tp": 1, "pp": 2, "dp": 1, "zero_stage": 1}}, tmp_path / f"full_pp{stage}.pt")
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


def test_extra_parameters_and_a_broadcastable_shape_are_refused(tiny_cfg, tmp_path):
    """A checkpoint of a model with one more single block (its extra weights would be dropped),
    or with a 1-query RQA (copy_ would broadcast it into all 16 queries), is refused naming the
    parameter, by init_from and by iomm-sample's loader alike."""
    from iomm_scale.sampling import load_trained

    torch.save({"model": _trainable(build_iomm(tiny_cfg("model.generator.num_single_layers=3")))},
               tmp_path / "state.pt")
    for load in (lambda: ckpt.apply_init_weights(build_iomm(tiny_cfg()), tmp_path, use_ema=False),
                 lambda: load_trained(tiny_cfg(), str(tmp_path))):
        with pytest.raises(ckpt.CheckpointError, match=r"parameters this model lacks.*single_blocks\.2"):
            load()
    torch.save({"model": _trainable(build_iomm(tiny_cfg("model.conditioner.rqa.num_queries=1")))},
               tmp_path / "state.pt")
    with pytest.raises(ValueError, match="queries.* has shape"):
        load_trained(tiny_cfg(), str(tmp_path))


def test_lora_adapters_on_another_base_are_refused(tmp_path):
    """iomm-sample / init_from of LoRA adapters checks the base generator's checksum, as resume does."""
    from iomm_scale.config import load_config

    cfg = load_config("configs/tiny_qwen_lora.yaml", ["data.resolution=32"])
    model = build_iomm(cfg)
    torch.save({"model": _trainable(model), "lora_base": "0" * 16}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="another base generator"):
        ckpt.apply_init_weights(model, tmp_path, use_ema=False)


def test_layout_free_files_of_two_saves_are_refused_and_old_copy_stands_in(tiny_cfg, tmp_path):
    """full_pp0.pt of a pp=1 save beside full_pp1.pt of an earlier pp=2 save would mix two runs."""
    params = _trainable(build_iomm(tiny_cfg()))
    d = tmp_path / "full"
    d.mkdir()
    torch.save({"params": params, "iomm_step": 9, "layout": {"pp": 1}}, d / "full_pp0.pt")
    torch.save({"params": {}, "iomm_step": 4, "layout": {"pp": 2}}, d / "full_pp1.pt")
    with pytest.raises(ValueError, match=r"not one save: full_pp0\.pt \(step 9, pp 1\), full_pp1\.pt \(step 4, pp 2\)"):
        ckpt.apply_init_weights(build_iomm(tiny_cfg()), d, use_ema=False)
    (d / "full_pp1.pt").unlink()
    torch.save({"params": params, "iomm_step": 9, "layout": {"pp": 2}}, d / "full_pp0.pt")  # stage 1 missing
    with pytest.raises(ValueError, match="not one save"):
        ckpt.read_full_parts(d)
    torch.save({"params": params, "iomm_step": 9, "layout": {"pp": 1}}, d / "full_pp0.pt")
    ckpt.replace_dir(d, tmp_path / "moved")  # replace_dir's crash window: only <dir>.old exists
    (tmp_path / "moved").rename(tmp_path / "full.old")
    assert ckpt.init_source(d) == ("full", tmp_path / "full.old")
    assert len(ckpt.read_full_parts(d)) == 1


def test_export_diffusers_writes_a_transformer_diffusers_loads(tiny_cfg, tmp_path, capsys):
    """`python -m iomm_scale.cli export_diffusers`: a trained run's EMA generator as a diffusers
    folder: FluxTransformer2DModel.from_pretrained holds exactly our weights (adapter key map),
    and the conditioner file holds the trained RQA."""
    import diffusers
    from safetensors.torch import load_file

    from iomm_scale.cli import export_diffusers_main
    from iomm_scale.models.adapters import ADAPTERS, adapter_for
    from iomm_scale.models.adapters.common import convert_to_theirs
    from iomm_scale.sampling import load_trained
    from iomm_scale.train.trainer import Trainer

    t = Trainer(tiny_cfg("train.steps=1", "optim.ema_decay=0.5"), run_dir=tmp_path / "run")
    t.train_step()
    t.save()
    export_diffusers_main(["--config", "configs/tiny.yaml", "--checkpoint", str(tmp_path / "run"),
                           "--out", str(tmp_path / "out")])
    assert "transformer" in capsys.readouterr().out
    ours = load_trained(tiny_cfg(), str(tmp_path / "run"), use_ema=True)  # what was exported
    theirs = dict(convert_to_theirs(ours.generator.state_dict(), adapter_for("flux").key_maps(ours.generator.cfg)))
    loaded = getattr(diffusers, ADAPTERS["flux"][1]).from_pretrained(tmp_path / "out" / "transformer").state_dict()
    assert loaded.keys() == theirs.keys()
    assert all(torch.equal(loaded[k], theirs[k]) for k in theirs)
    assert torch.equal(t.ema.shadow["generator.x_embedder.weight"], ours.generator.x_embedder.weight)
    cond = load_file(tmp_path / "out" / "iomm_conditioner.safetensors")
    rqa = ours.conditioner.rqa.state_dict()
    assert {k for k in cond if k.startswith("rqa.")} == {f"rqa.{k}" for k in rqa}
    assert all(torch.equal(cond[f"rqa.{k}"], v) for k, v in rqa.items())
