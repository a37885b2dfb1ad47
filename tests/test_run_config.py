"""Bad configs fail with one clear message naming the file and the key, before any model is built."""

import os
import re

import pytest

from iomm_scale import cli
from iomm_scale.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["optim.lr=-1e-4"], "optim.lr", "must be > 0"),
        (["optim.eps=0"], "optim.eps", "must be > 0"),
        (["optim.grad_clip=-1"], "optim.grad_clip", "must be >= 0"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay", "must be >= 0"),
        (["optim.ema_decay=1.0"], "optim.ema_decay", "(0, 1)"),
        (["flow.cond_dropout=1.0"], "flow.cond_dropout", "[0, 1)"),
        (["flow.cond_dropout=-0.1"], "flow.cond_dropout", "[0, 1)"),
        (["flow.logit_std=0"], "flow.logit_std", "must be > 0"),
        (["train.grad_accum=0"], "train.grad_accum", "must be >= 1"),
        (["model.conditioner.mask_ratio=1.0"], "model.conditioner.mask_ratio", "[0, 1)"),
        (["data.resolution=36"], "data.resolution", "multiple of VAE factor x patch = 8"),
        (["model.conditioner.mllm.random_init=false", "model.conditioner.mllm.path=/nonexistent/internvl"],
         "model.conditioner.mllm.path", "does not exist"),
        (["model.conditioner.mllm.random_init=false"], "model.conditioner.mllm.path", "missing"),
        (["train.stepz=10"], "train.stepz", "unknown key (did you mean 'steps'?)"),
        (["train.stpes=10"], "train.stpes", "unknown key (did you mean 'steps'?)"),
        (["model.generator.num_layer=3"], "model.generator.num_layer", "(did you mean 'num_layers'?)"),
        (["train.steps=ten"], "train.steps", "expected an integer"),
        (["optim.betas=[0.9]"], "optim.betas", "two numbers"),
        (["model.generator.family=unet"], "model.generator.family", "unknown family"),
        (["model.generator.axes_dims_rope=[4,4,4]"], "model.generator.axes_dims_rope", "must sum to head_dim"),
        (["data.source=webdataset"], "data.webdataset", "missing"),
        (["model.vae.type=vqgan"], "model.vae.type", "must be one of"),
        (["train.precision=fp16"], "train.precision", "fp32 or bf16"),
        (["model.generator.attention_backend=flash"], "model.generator.attention_backend", "'flash' is unavailable"),
        (["model.generator.attention_backend=xformers"], "model.generator.attention_backend", "must be one of"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints", "must be >= 1"),
        (["train.ckpt_every=-1"], "train.ckpt_every", "must be >= 0"),
        (["source=foo"], "source", "unknown key"),  # the config's file name, not a setting
        (["train.grad_accum=4", "parallel.num_microbatches=2"], "parallel.num_microbatches", "both set"),
    ],
)
def test_bad_values_name_file_and_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    msg = str(err.value)
    assert "configs/tiny.yaml" in msg and f"{key}:" in msg and words in msg, msg


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["optim.lr=0", "train.steps=0"])
    assert "2 problems" in str(err.value) and "optim.lr" in str(err.value) and "train.steps" in str(err.value)


def test_bad_yaml_file_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(TINY, ["train.steps"])
    with pytest.raises(ConfigError, match="is not a section"):
        load_config(TINY, ["train.steps.x=1"])
    with pytest.raises(ConfigError, match=r"override data.webdataset.image_shards: value .* is not valid YAML.*quote"):
        load_config(TINY, ["data.webdataset.image_shards=[/data/img-{000000..000003}.tar]"])


@pytest.mark.parametrize("overrides, words", [
    (["data.source=webdataset", "data.webdataset.image_shards=['/nowhere/img-{000000..000003}.tar']"],
     ["data.webdataset.image_shards", "4 of 4 shards do not exist", "/nowhere/img-000000.tar"]),
    (["train.init_from=/nowhere/ema"], ["train.init_from", "no such file or directory"]),
])
def test_missing_inputs_stop_iomm_train_before_the_model_is_built(capsys, monkeypatch, tmp_path, overrides, words):
    import iomm_scale.train.trainer as trainer

    monkeypatch.setattr(trainer, "build_iomm", lambda *a, **k: pytest.fail("model built despite a missing input"))
    with pytest.raises(SystemExit) as exit_:
        cli.train_main(["--config", TINY, "--run-dir", str(tmp_path), *overrides])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and all(w in err for w in words) and "Traceback" not in err, err


def test_cli_prints_one_line_and_exits_2_without_building(capsys, monkeypatch):
    import iomm_scale.iomm as iomm

    monkeypatch.setattr(iomm, "build_iomm", lambda *a, **k: pytest.fail("model built despite a bad config"))
    with pytest.raises(SystemExit) as exit_:
        cli.train_main(["--config", TINY, "model.conditioner.mask_ratio=1.5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and "model.conditioner.mask_ratio" in err and "Traceback" not in err


def test_vae_generator_channel_mismatch_is_caught_before_the_mllm(tiny_cfg):
    from iomm_scale.iomm import build_iomm

    with pytest.raises(ValueError, match="in_channels"):
        build_iomm(tiny_cfg("model.vae.pixel_factor=2"))


def test_overrides_and_presets_load():
    cfg = load_config(TINY, ["optim.lr=3e-4", "model.generator.num_layers=1", "flow.shift=3"])
    assert cfg.optim.lr == 3e-4 and cfg.generator.num_layers == 1 and cfg.flow.shift == 3.0
    for name in ("b.yaml", "l.yaml"):
        cfg = load_config(os.path.join(ROOT, "configs", name))
        assert cfg.model.conditioner.mask_ratio == 0.85 and cfg.optim.lr == 1e-4 and cfg.optim.betas == [0.9, 0.95]


def test_preset_parameter_counts_match_the_paper():
    from iomm_scale.profiling.params import count_config

    b = count_config(load_config(os.path.join(ROOT, "configs", "b.yaml")))
    l_ = count_config(load_config(os.path.join(ROOT, "configs", "l.yaml")))
    assert abs(b["generator (total)"] / 1.6e9 - 1) < 0.03
    assert abs(l_["generator (total)"] / 2.7e9 - 1) < 0.03
    assert abs(b["rqa"] / 29e6 - 1) < 0.03  # "about 29M" at InternVL3-2B width


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))))
def test_every_shipped_config_round_trips_through_its_saved_form(name):
    """What a run saves (cfg.to_dict(), in checkpoints and run_dir) loads back to the same config."""
    from iomm_scale.config import from_dict, load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", name))
    again = from_dict(cfg.to_dict(), source=f"saved {name}")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("argv, words", [
    (["--zero", "4"], "--zero 4: must be 0..3"),
    (["--checkpointing", "fulll"], "--checkpointing 'fulll'"),
    (["--checkpointing", "every_0"], "every_<k> with k >= 1"),
    (["--micro-batch", "0"], "--micro-batch 0: must be >= 1"),
    (["--checkpoint-mllm", "maybe"], "--checkpoint-mllm 'maybe'"),
])
def test_plan_memory_names_a_bad_sweep_value(argv, words):
    from iomm_scale.profiling.memory import main

    with pytest.raises(SystemExit, match=re.escape(words)):
        main(["--config", TINY, *argv])


def test_iomm_sample_refuses_a_non_image_before_building(tmp_path, capsys, monkeypatch):
    import iomm_scale.sampling as sampling
    from iomm_scale.train.trainer import Trainer

    t = Trainer(load_config(TINY, ["train.steps=1", "train.progress_bar=false"]), run_dir=tmp_path / "run")
    t.save()
    (tmp_path / "notimg.jpg").write_text("not an image")
    monkeypatch.setattr(sampling, "build_iomm", lambda *a, **k: pytest.fail("model built despite a bad image"))
    with pytest.raises(SystemExit) as exit_:
        cli.sample_main(["--config", TINY, "--checkpoint", str(tmp_path / "run"), "--images", str(tmp_path / "notimg.jpg")])
    assert exit_.value.code == 2 and "is not a readable image" in capsys.readouterr().err


def test_parallel_launcher_without_a_launcher_says_how_to_start_it():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    p = subprocess.run([sys.executable, "launchers/pretrain.py", "--config", TINY], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 2 and "torchrun" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_launcher_refuses_an_explicit_resume_path_it_cannot_use(tmp_path):
    """train.resume=<path> that is not a launcher checkpoint used to start from scratch silently."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "launchers/pretrain.py", "--config", TINY, f"train.resume={tmp_path}/step_1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"})
    assert p.returncode == 2 and "checkpoint error: train.resume=" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_grad_accum_is_the_pipelines_micro_batch_count():
    """train.grad_accum=4 with pp=2 is 4 1F1B micro-batches (it was refused as num_microbatches=1 < pp)."""
    from iomm_scale.parallel.dist_trainer import split_parallel_args

    cfg, pcfg = split_parallel_args(TINY, ["parallel.pp=2", "parallel.zero_stage=1", "train.grad_accum=4"])
    pcfg.validate_or_raise()
    assert cfg.micro_batches == pcfg.num_microbatches == 4
