"""Steps with a non-finite loss or gradient norm (train/nonfinite.py) in iomm-train: the update is
skipped (weights, optimizer state and EMA bit for bit as before), the step is logged with its
samples and counted, the count survives a resume, and a streak past train.max_nonfinite_steps
stops the run after checkpointing the untouched weights. The NaN is real: a forward hook on the
generator (the tests below), or a learning rate that makes the weights overflow (the CLI test).
The launchers' half is in tests/parallel/test_dist.py (a NaN on one rank, every layout)."""

import copy
import json
import math
import os

import pytest
import torch

from iomm_scale.train.checkpoint import load_checkpoint
from iomm_scale.train.nonfinite import NonFiniteError, NonFiniteGuard
from iomm_scale.train.trainer import Trainer


def poison(trainer: Trainer, steps: set[int], snapshots: dict) -> None:
    """Make the generator's output NaN while step s (1-based, as logged) of `steps` runs, and keep a
    copy of weights, EMA and optimizer state as they were when it started."""

    def hook(module, args, output):
        step = trainer.step + 1
        if step not in steps:
            return None
        snapshots.setdefault(step, {
            "weights": {k: v.detach().clone() for k, v in trainer.model.trainable_state_dict().items()},
            "ema": {k: v.clone() for k, v in trainer.ema.shadow.items()} if trainer.ema else None,
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        })
        return output * float("nan")

    trainer.model.generator.register_forward_hook(hook)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_optimizer(a: dict, b: dict) -> bool:
    """Moments, momenta and step counts equal (the learning rate is set by the schedule each step)."""
    return a["state"].keys() == b["state"].keys() and all(same(a["state"][i], b["state"][i]) for i in a["state"])


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_a_nan_step_applies_nothing_and_is_counted(tiny_cfg, tmp_path, optim, capsys):
    cfg = tiny_cfg("train.steps=4", "optim.ema_decay=0.9", f"optim.name={optim}")
    t = Trainer(cfg, run_dir=tmp_path)
    snaps: dict = {}
    poison(t, {3}, snaps)
    t.fit()
    after = {"weights": t.model.trainable_state_dict(), "ema": t.ema.shadow}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    out = capsys.readouterr().out
    # step 4 ran normally from the state step 3 left: so compare step 3's effect directly
    t2 = Trainer(cfg, run_dir=tmp_path / "b")
    snaps2: dict = {}
    poison(t2, {3}, snaps2)
    for _ in range(3):
        t2.train_step()
    assert same(t2.model.trainable_state_dict(), snaps2[3]["weights"])  # step 3 changed no weight
    assert same(t2.ema.shadow, snaps2[3]["ema"])
    assert same_optimizer(t2.optimizer.state_dict(), snaps2[3]["optimizer"])
    # and the run went on: step 4 updated the weights, all finite
    assert not same(after["weights"], snaps[3]["weights"])
    assert all(torch.isfinite(v).all() for v in list(after["weights"].values()) + list(after["ema"].values()))
    # logged: the skipped step has no loss in the window, and the count
    by_step = {line["step"]: line for line in lines}
    assert by_step[3]["loss"] is None and by_step[3]["loss_last"] is None and by_step[3]["nonfinite_steps"] == 1
    assert math.isnan(by_step[3]["grad_norm"])
    assert by_step[2]["nonfinite_steps"] == 0 and math.isfinite(by_step[4]["loss"])
    assert [s for s, _ in t.history] == [1, 2, 4]  # loss_curve.png: no NaN point
    assert "step 3: loss nan, gradient norm nan: not finite, the update was skipped (1 in a row, 1 in this run" in out
    assert "its samples: " in out and "photo" in out.split("its samples: ")[1]  # the batch's keys
    # kept in the checkpoint, restored on resume
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000004")["nonfinite"] == {"total": 1, "streak": []}
    resumed = Trainer(tiny_cfg("train.steps=5", "optim.ema_decay=0.9", f"optim.name={optim}", "train.resume=auto"),
                      run_dir=tmp_path)
    assert resumed.step == 4 and resumed.nonfinite.total == 1


def test_a_streak_past_the_limit_checkpoints_the_untouched_weights_and_stops(tiny_cfg, tmp_path):
    t = Trainer(tiny_cfg("train.steps=10", "train.max_nonfinite_steps=2", "optim.ema_decay=0.9"), run_dir=tmp_path)
    snaps: dict = {}
    poison(t, {2, 4, 5, 6}, snaps)  # 2 alone is tolerated; 4, 5 are two in a row; 6 is one too many
    with pytest.raises(NonFiniteError) as e:
        t.fit()
    msg = str(e.value)
    assert msg.startswith("steps 4-6: 3 steps in a row with a non-finite loss or gradient norm "
                          "(train.max_nonfinite_steps: 2); stopped. No update was applied since step 3")
    saved = tmp_path / "checkpoints" / "step_00000006"
    assert str(saved) in msg
    state = load_checkpoint(saved)
    assert state["step"] == 6 and state["nonfinite"] == {"total": 4, "streak": [4, 5, 6]}
    assert same(state["model"], snaps[4]["weights"]) and same(state["ema"]["shadow"], snaps[4]["ema"])
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_max_nonfinite_steps_zero_stops_at_the_first(tiny_cfg, tmp_path):
    t = Trainer(tiny_cfg("train.steps=5", "train.max_nonfinite_steps=0"), run_dir=tmp_path)
    poison(t, {2}, {})
    with pytest.raises(NonFiniteError, match=r"^step 2: a non-finite loss or gradient norm \(train.max_nonfinite_steps: 0\); stopped. No update was applied since step 1"):
        t.fit()


def test_guard_counts_streaks_and_round_trips():
    g = NonFiniteGuard(limit=1)
    assert g.record(1, True, 0.5, 1.0) is None
    assert "step 2: loss nan, gradient norm inf" in g.record(2, False, float("nan"), float("inf"), ["a", "b"])
    assert not g.exceeded
    g.record(3, True, 0.4, 1.0)
    g.record(4, False, float("nan"), float("nan"), [str(i) for i in range(10)])
    warning = g.record(5, False, float("nan"), float("nan"), [str(i) for i in range(10)])
    assert "0, 1, 2, 3, 4, 5, 6, 7 (+2 more)" in warning and "2 in a row, 3 in this run" in warning
    assert g.exceeded
    h = NonFiniteGuard(limit=1)
    h.load_state_dict(g.state_dict())
    assert (h.total, h.streak) == (3, [4, 5])
    h.load_state_dict(None)  # a checkpoint from before the guard
    assert (h.total, h.streak) == (0, [])


def test_the_cli_stops_a_diverging_run_with_status_4(tmp_path, capsys):
    """No hook: lr 1e30 makes the first update overflow the weights, every later step is NaN."""
    from iomm_scale.cli import train_main

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(SystemExit) as e:
        train_main(["--config", os.path.join(root, "configs/tiny.yaml"), "--run-dir", str(tmp_path),
                    "optim.lr=1e30", "optim.warmup_steps=0", "train.steps=20", "train.max_nonfinite_steps=2",
                    "train.progress_bar=false", "train.num_samples=0", "data.batch_size=4", "train.log_every=1"])
    assert e.value.code == 4
    err = capsys.readouterr().err
    assert err.startswith("training error: steps 2-4: 3 steps in a row with a non-finite loss or gradient norm")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["nonfinite_steps"] for line in lines] == [0, 1, 2, 3]
    assert (tmp_path / "checkpoints" / "step_00000004").is_dir()


def test_config_refuses_a_negative_limit(tiny_cfg):
    from iomm_scale.config import ConfigError

    with pytest.raises(ConfigError, match="train.max_nonfinite_steps: must be >= 0"):
        tiny_cfg("train.max_nonfinite_steps=-1")


def test_a_checkpoint_holding_nan_is_refused_by_resume_init_from_and_sampling(tiny_cfg, tmp_path):
    """Checkpoints written before the guard (or edited by hand) can hold NaN: resuming, starting a
    fine-tune from one, or sampling from one stops at once, naming the tensor."""
    from iomm_scale.sampling import load_trained
    from iomm_scale.train.checkpoint import CheckpointError

    t = Trainer(tiny_cfg("train.steps=1", "optim.ema_decay=0.9"), run_dir=tmp_path / "a")
    t.train_step()
    path = t.save()
    state = torch.load(path / "state.pt", weights_only=False)
    name = "generator.x_embedder.weight"
    state["model"][name][0, :3] = float("nan")
    torch.save(state, path / "state.pt")
    with pytest.raises(CheckpointError, match=rf"^resuming from {path}: its weights are not finite \(NaN / inf in 1 "
                                              rf"tensor, e.g. {name}\): written after the run diverged\?"):
        Trainer(tiny_cfg("train.steps=2", "optim.ema_decay=0.9", "train.resume=auto"), run_dir=tmp_path / "a")
    cfg = tiny_cfg("train.steps=2", f"train.init_from={path}", "train.init_from_ema=false")
    with pytest.raises(CheckpointError, match=rf"^train.init_from={path}: its weights are not finite \(NaN / inf in 1 tensor, e.g. {name}\)"):
        Trainer(cfg, run_dir=tmp_path / "b")
    with pytest.raises(CheckpointError, match=rf"its weights are not finite \(NaN / inf in 1 tensor, e.g. {name}\)"):
        load_trained(cfg, str(path), use_ema=False)
    # the EMA alone
    state = torch.load(path / "state.pt", weights_only=False)
    state["model"][name].nan_to_num_(0.0)
    state["ema"]["shadow"][name][1, 1] = float("inf")
    torch.save(state, path / "state.pt")
    with pytest.raises(CheckpointError, match=rf"its EMA weights are not finite \(NaN / inf in 1 tensor, e.g. {name}\)"):
        Trainer(tiny_cfg("train.steps=2", "optim.ema_decay=0.9", "train.resume=auto"), run_dir=tmp_path / "a")


def test_weights_an_update_overflowed_are_never_checkpointed(tiny_cfg, tmp_path):
    """An applied update that overflows a weight to inf (here an optimizer step hook writes the
    inf, as an lr far too high would: its gradients were finite, so the step applied). A periodic
    save then is refused, keeping the newest good checkpoint; without one, so is the save of the
    stop after the NaN streak that follows."""
    good = Trainer(tiny_cfg("train.steps=1"), run_dir=tmp_path)
    good.fit()
    newest = tmp_path / "checkpoints" / "step_00000001"

    def overflowing(trainer, at_step):
        def hook(optimizer, args, kwargs):
            if trainer.step + 1 == at_step:
                trainer.model.generator.x_embedder.weight.data[0, 0] = float("inf")
        trainer.optimizer.register_step_post_hook(hook)
        return trainer

    over = ["train.resume=auto", "train.max_nonfinite_steps=1"]
    t = overflowing(Trainer(tiny_cfg("train.steps=5", "train.ckpt_every=2", *over), run_dir=tmp_path), 2)
    with pytest.raises(NonFiniteError, match=r"^step 2: the weights are not finite \(1 tensor, e.g. "
                                             rf"generator.x_embedder.weight\), so no checkpoint was written \(the newest, "
                                             rf"{newest}, is kept\)"):
        t.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    t = overflowing(Trainer(tiny_cfg("train.steps=9", *over), run_dir=tmp_path), 2)
    with pytest.raises(NonFiniteError, match=r"^step 4: the weights are not finite \(1 tensor, e.g. "
                                             rf"generator.x_embedder.weight\), so no checkpoint was written \(the newest, "
                                             rf"{newest}, is kept\)"):
        t.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_nan_step_on_cuda_in_bf16_applies_nothing(tiny_cfg, tmp_path):
    """The same skip on a GPU under bf16 autocast (the loss and norm read back from the device)."""
    t = Trainer(tiny_cfg("train.device=cuda", "train.precision=bf16", "train.steps=3", "optim.ema_decay=0.9"),
                run_dir=tmp_path)
    snaps: dict = {}
    poison(t, {2}, snaps)
    t.train_step()
    out = t.train_step()
    assert not out["applied"] and math.isnan(out["loss"])
    assert same(t.model.trainable_state_dict(), snaps[2]["weights"]) and same(t.ema.shadow, snaps[2]["ema"])
    assert t.train_step()["applied"]


def test_a_nonfinite_loss_poisons_its_gradients_and_a_finite_one_is_untouched():
    """The launchers' guard (train/nonfinite.poison_nonfinite): a finite loss keeps its value and
    gradients bit for bit; a NaN or inf one, even with finite gradients of its own (a constant
    term gone bad), gives NaN gradients everywhere, which the optimizers' norm check skips."""
    from iomm_scale.train.nonfinite import poison_nonfinite

    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(5, dtype=dtype, requires_grad=True)
        (w.square().sum() * 0.37).backward()
        want = w.grad.clone()
        w.grad = None
        loss = poison_nonfinite(w.square().sum() * 0.37)
        loss.backward()
        assert loss.dtype == dtype and torch.equal(w.grad, want)
        for bad in (float("nan"), float("inf"), -float("inf")):
            w.grad = None
            loss = poison_nonfinite(w.square().sum() * 0.37 + bad)
            loss.backward()
            assert not torch.isfinite(loss) and torch.isnan(w.grad).all()
