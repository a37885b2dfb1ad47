import json
import os
import subprocess
import sys

import pytest
import torch

from iomm_scale.train.checkpoint import load_checkpoint
from iomm_scale.train.trainer import Trainer


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_resume_is_bitwise_identical(tiny_cfg, tmp_path, optim):
    opts = ["optim.ema_decay=0.9", f"optim.name={optim}"]
    straight = Trainer(tiny_cfg("train.steps=6", *opts), run_dir=tmp_path / "a")
    for _ in range(6):
        straight.train_step()

    first = Trainer(tiny_cfg("train.steps=3", *opts), run_dir=tmp_path / "b")
    for _ in range(3):
        first.train_step()
    first.save()
    del first
    resumed = Trainer(tiny_cfg("train.steps=6", *opts, "train.resume=auto"), run_dir=tmp_path / "b")
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()

    assert [l for _, l in straight.history] == [l for _, l in resumed.history]  # bitwise
    a, b = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight.ema.shadow[k], resumed.ema.shadow[k]) for k in a)


def test_checkpoints_are_atomic_and_pruned(tiny_cfg, tmp_path):
    from iomm_scale.train import checkpoint as ckpt

    t = Trainer(tiny_cfg("train.steps=3", "train.keep_checkpoints=2"), run_dir=tmp_path)
    for _ in range(3):
        t.train_step()
        t.save()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002", "step_00000003"]
    # a crash mid-write leaves a .tmp directory behind: it is never picked up
    (tmp_path / "checkpoints" / "step_00000004.tmp").mkdir()
    assert ckpt.find_latest(tmp_path / "checkpoints").name == "step_00000003"


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    from iomm_scale.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    t = Trainer(tiny_cfg("train.steps=3", "train.keep_checkpoints=3"), run_dir=tmp_path)
    for _ in range(2):
        t.train_step()
        t.save()
    t.train_step()

    def disk_full(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full)
        with pytest.raises(OSError, match="No space left"):
            t.save()
    assert not (root / "step_00000003").exists() and (root / "step_00000003.tmp").exists()
    assert (root / "latest").read_text() == "step_00000002"
    assert ckpt.find_latest(root).name == "step_00000002" and ckpt.load_checkpoint(ckpt.find_latest(root))["step"] == 2
    assert Trainer(tiny_cfg("train.steps=3", "train.resume=auto"), run_dir=tmp_path).step == 2

    # Re-writing a step: a crash between moving the old copy aside and putting the new one in
    # place leaves `latest` naming a missing directory for an instant; the old copy stands in.
    real_replace = os.replace

    def crash_on_publish(src, dst):
        if str(src).endswith("step_00000002.tmp"):
            raise OSError("killed")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash_on_publish)
        with pytest.raises(OSError, match="killed"):
            ckpt.save_checkpoint(root, 2, {"step": 2, "version": "new"}, keep=3)
    found = ckpt.find_latest(root)
    assert found.name == "step_00000002.old" and "version" not in ckpt.load_checkpoint(found)
    ckpt.save_checkpoint(root, 2, {"step": 2, "version": "new"}, keep=3)
    found = ckpt.find_latest(root)
    assert found.name == "step_00000002" and ckpt.load_checkpoint(found)["version"] == "new"
    assert not (root / "step_00000002.old").exists()


def test_fit_saves_each_step_once_and_a_finished_run_not_again(tiny_cfg, tmp_path, monkeypatch):
    from iomm_scale.train import checkpoint as ckpt

    saved = []
    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda root, step, *a, **k: saved.append(step) or real_save(root, step, *a, **k))
    Trainer(tiny_cfg("train.steps=4", "train.ckpt_every=2"), run_dir=tmp_path).fit()
    assert saved == [2, 4]  # the final save does not write step 4 a second time
    Trainer(tiny_cfg("train.steps=4", "train.ckpt_every=2", "train.resume=auto"), run_dir=tmp_path).fit()
    assert saved == [2, 4]  # resumed at the end: nothing to write


def test_sigterm_saves_at_the_next_step_and_says_so(tmp_path, capsys, monkeypatch):
    import signal

    from iomm_scale import cli

    real_step = Trainer.train_step

    def step_then_preempt(self):
        out = real_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM / torchrun would, mid-run
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_preempt)
    before = signal.getsignal(signal.SIGTERM)
    cli.train_main(["--config", "configs/tiny.yaml", "--run-dir", str(tmp_path), "train.steps=50",
                    "train.progress_bar=false", "data.batch_size=2", "data.builtin.crops_per_photo=1",
                    "train.num_samples=0"])
    out = capsys.readouterr().out
    assert f"stopped by signal at step 2; checkpoint {tmp_path / 'checkpoints' / 'step_00000002'}" in out
    assert "done:" not in out
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is given back
    # the steps since the last metrics line (log_every 10) are logged before stopping, not lost
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss_steps"]) for x in lines] == [(2, 2)]


def test_fit_writes_metrics_checkpoint_and_pngs(tiny_cfg, tmp_path):
    t = Trainer(tiny_cfg("train.steps=4", "train.num_samples=2", "flow.sample_steps=2", "train.log_every=2"),
                run_dir=tmp_path)
    t.fit()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4]
    assert all(l["loss"] > 0 and l["samples_per_s"] > 0 for l in lines)
    for name in ("samples.png", "loss_curve.png", "config.yaml", "checkpoints/latest"):
        assert (tmp_path / name).exists(), name


def test_cli_runs_the_tiny_config_end_to_end(tmp_path, capsys):
    """The README's first command, with fewer steps."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "iomm_scale.cli", "train", "--config", os.path.join(root, "configs/tiny.yaml"),
           "--run-dir", str(tmp_path), "train.steps=12", "train.progress_bar=false", "flow.sample_steps=2",
           "train.ckpt_every=6"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done: step 12" in out.stdout
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 12
    assert (tmp_path / "samples.png").exists() and (tmp_path / "checkpoints" / "step_00000012").exists()
    # run again: it resumes at step 12 = train.steps and says so (not "loss ... -> nan")
    from iomm_scale.cli import train_main

    train_main(cmd[4:])
    assert "done: the run is already at step 12 (train.steps=12" in capsys.readouterr().out


def test_tiny_s3dit_preset_trains_the_xl_recipe(tmp_path):
    """configs/tiny_s3dit.yaml (the IOMM-XL path at toy size): S3-DiT generator, Muon for its
    hidden matrices, no EMA; a few steps lower the loss, with the routing table written."""
    from iomm_scale.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, "configs", "tiny_s3dit.yaml"),
                      ["train.steps=8", "train.progress_bar=false", "train.num_samples=0", "train.resume=never",
                       "data.batch_size=8", "data.builtin.crops_per_photo=1", "optim.warmup_steps=0"])
    trainer = Trainer(cfg, run_dir=tmp_path)
    assert type(trainer.model.generator).__name__ == "S3DiT" and trainer.ema is None
    trainer.fit()
    losses = [x for _, x in trainer.history]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < losses[0]
    assert "[muon] muon: 30 tensors" in (tmp_path / "optimizer_routing.txt").read_text()


def test_iomm_sample_from_a_checkpoint(tiny_cfg, tmp_path, capsys):
    from PIL import Image

    from iomm_scale import cli

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    overrides = ["data.batch_size=4", "train.num_samples=0", "train.progress_bar=false", "data.builtin.crops_per_photo=1"]
    t = Trainer(tiny_cfg("train.steps=2", "optim.ema_decay=0.9"), run_dir=tmp_path / "run")
    t.fit()
    ref = tmp_path / "ref.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(ref)
    out = tmp_path / "grid.png"
    cli.sample_main(["--config", os.path.join(root, "configs/tiny.yaml"), *overrides, "flow.sample_steps=2",
                     "--checkpoint", str(tmp_path / "run/checkpoints/step_00000002"), "--images", str(ref),
                     "--prompt", "a red circle on a blue background", "--out", str(out)])
    grid = Image.open(out)
    assert grid.size[1] > grid.size[0] / 2  # three rows: reference, image-conditioned, text-conditioned
    # the run dir stands for its newest checkpoint
    again = tmp_path / "again.png"
    cli.sample_main(["--config", os.path.join(root, "configs/tiny.yaml"), *overrides, "flow.sample_steps=2",
                     "--checkpoint", str(tmp_path / "run"), "--images", str(ref),
                     "--prompt", "a red circle on a blue background", "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # named before any model is built
        cli.sample_main(["--config", os.path.join(root, "configs/tiny.yaml"), "--checkpoint", str(tmp_path / "nowhere"),
                         "--images", str(ref)])
    assert exit_.value.code == 2
    assert f"--checkpoint={tmp_path / 'nowhere'}: no such file or directory" in capsys.readouterr().err


def test_mixed_finetune_starts_from_pretrained_weights(tiny_cfg, tmp_path):
    """Stage 1 image-only, then stage 2 on the lambda = 0.5 mixture of images and captioned shapes."""
    pre = Trainer(tiny_cfg("train.steps=2", "optim.ema_decay=0.9"), run_dir=tmp_path / "pre")
    pre.fit()
    ft = Trainer(tiny_cfg("train.steps=3", "data.image_only_fraction=0.5", f"train.init_from={tmp_path}/pre/checkpoints/step_00000002"),
                 run_dir=tmp_path / "ft")
    assert ft.step == 0
    for n, v in ft.model.trainable_state_dict().items():
        assert torch.equal(v, pre.ema.shadow[n])
    captions = []
    for _ in range(3):
        batch = next(ft.loader)
        captions += batch["captions"]
    assert any(c is None for c in captions) and any(c is not None for c in captions)
    out = ft.train_step()
    assert out["loss"] > 0


def test_wandb_offline_run_is_written(tiny_cfg, tmp_path, monkeypatch):
    import wandb  # in the test extra: no skip

    assert wandb.__version__
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    t = Trainer(tiny_cfg("train.steps=2", "train.log_every=1", "train.wandb.enabled=true"), run_dir=tmp_path)
    t.fit()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir())


def test_resume_with_an_ema_the_checkpoint_lacks_starts_it_from_the_resumed_weights(tiny_cfg, tmp_path):
    """A checkpoint saved with optim.ema_decay null, resumed with an EMA: the EMA starts from the
    resumed weights (it used to keep the random initial ones, which sampling then used), stays on
    the parameters' tensors, and a changed decay in the config applies on resume."""
    first = Trainer(tiny_cfg("train.steps=2", "optim.ema_decay=null"), run_dir=tmp_path)
    for _ in range(2):
        first.train_step()
    first.save()
    resumed = Trainer(tiny_cfg("train.steps=4", "optim.ema_decay=0.9", "train.resume=auto"), run_dir=tmp_path)
    live = resumed.model.trainable_state_dict()
    assert resumed.step == 2
    assert all(torch.equal(resumed.ema.shadow[n], live[n]) for n in live)
    for _ in range(2):
        resumed.train_step()
    resumed.save()
    again = Trainer(tiny_cfg("train.steps=4", "optim.ema_decay=0.5", "train.resume=auto"), run_dir=tmp_path)
    tensors = {n: t for n, t in again.ema.shadow.items()}
    ckpt_state = load_checkpoint(tmp_path / "checkpoints" / "step_00000004")
    again.load_state_dict(ckpt_state)
    assert again.ema.decay == 0.5  # the config's, not the checkpoint's 0.9
    assert all(again.ema.shadow[n] is tensors[n] for n in tensors)  # loaded into its own tensors (device kept)
    assert all(torch.equal(again.ema.shadow[n], ckpt_state["ema"]["shadow"][n]) for n in tensors)


def test_resume_under_another_model_config_is_refused(tiny_cfg, tmp_path):
    """copy_ would broadcast a 1-query RQA into 16 queries; a resume names the parameter instead."""
    t = Trainer(tiny_cfg("train.steps=1", "model.conditioner.rqa.num_queries=1"), run_dir=tmp_path)
    t.save()
    with pytest.raises(ValueError, match="queries.*shape"):
        Trainer(tiny_cfg("train.steps=2", "train.resume=auto"), run_dir=tmp_path)
    # the failed launch left the run's own config (it used to write its own before resuming)
    import yaml

    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["conditioner"]["rqa"]["num_queries"] == 1 and saved["run_dir"] == str(tmp_path)


def test_a_sample_grid_dealt_out_in_parts_is_the_whole_grid(tiny_cfg):
    """The launchers deal the mid-run grid over the data-parallel replicas (sample_grid's `part`):
    the parts' rows, concatenated, are the whole grid's, each row from its own noise, for any
    number of parts (padded when it does not divide the grid, more parts than rows included)."""
    from iomm_scale.iomm import build_iomm
    from iomm_scale.train.trainer import grid_rows, sample_grid

    assert grid_rows(5, None) == [0, 1, 2, 3, 4]
    assert [grid_rows(5, (i, 2)) for i in range(2)] == [[0, 1, 2], [3, 4, 4]]
    assert [grid_rows(2, (i, 4)) for i in range(4)] == [[0], [1], [1], [1]]
    cfg = tiny_cfg("train.num_samples=5", "flow.sample_steps=3")
    model = build_iomm(cfg).eval()
    refs, whole = sample_grid(model, cfg, "cpu")
    assert whole.shape == (5, 3, 32, 32) and whole.std() > 0.1
    for count in (2, 3, 8):
        parts = [sample_grid(model, cfg, "cpu", part=(i, count)) for i in range(count)]
        assert all(torch.equal(r, refs) for r, _ in parts)
        assert all(p.shape[0] == -(-5 // count) for _, p in parts)
        got = torch.cat([p for _, p in parts])[:5]
        assert (got - whole).abs().max() < 1e-5, (count, (got - whole).abs().max())
    with pytest.raises(ValueError, match="noise must be"):
        model.sample(2, 32, pixels=refs[:2], noise=torch.zeros(3, 3, 32, 32))
