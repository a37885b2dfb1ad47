"""Held-out evaluation (train/evaluate.py): it computes the training objective, each sample's
figure depends on nothing but the weights and the sample (not its micro-batch, not the number
of data-parallel ranks), raw and feature shards give the same figure, and a run with
evaluation on trains bit for bit as one with it off. The multi-process layouts are checked
against these figures in tests/parallel (DP2 ZeRO-3 in the worker, TP2 / DP2 in the launchers)."""

import copy
import json
import os

import pytest
import torch

from iomm_scale.config import ConfigError, load_config
from iomm_scale.train.evaluate import EvalSet, build_eval_set, evaluate, evaluate_model, metrics
from iomm_scale.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def model_losses(model):
    def run(batch, draws):
        with torch.no_grad():
            return model.sample_losses(batch, draws)
    return run


def test_eval_loss_is_the_training_objective(tiny_cfg):
    """Draws that repeat the training path's (t, noise, dropout, keep mask from the global RNG,
    in its order) give back model.loss exactly: the evaluation computes the same objective."""
    from iomm_scale import flow

    trainer = Trainer(tiny_cfg("flow.cond_dropout=0.0", "data.batch_size=3"))
    model, batch = trainer.model, next(trainer.loader)

    def training_draws(latents, num_image_tokens, mask_ratio):
        b = latents.shape[0]
        t = flow.sample_timesteps(b, model.cfg.flow, latents.shape[-2] * latents.shape[-1] // 4)
        noise = torch.randn_like(latents)
        torch.rand(b)  # the dropout draw (rate 0 here)
        return t, noise, torch.rand(b, num_image_tokens) >= mask_ratio

    with torch.no_grad():
        torch.manual_seed(7)
        expected = model.loss(batch)
        torch.manual_seed(7)
        per_sample = model.sample_losses(batch, training_draws)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample.mean(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("image_only_fraction", [1.0, 0.5])
def test_a_samples_loss_does_not_depend_on_its_micro_batch_or_the_ranks(tiny_cfg, image_only_fraction):
    """7 held-out samples in micro-batches of 4 (4 + 3) and of 2 (2 + 2 + 2 + 1), and dealt out
    over 1, 2 and 3 "ranks" (their vectors summed as the all-reduce does): the same per-sample
    losses and metrics; with captions too (the mixture: prompts of other lengths are left-padded
    to their micro-batch's longest). Draws tied to the micro-batch instead of the sample fail this."""
    mix = f"data.image_only_fraction={image_only_fraction}"
    trainer = Trainer(tiny_cfg("eval.every=1", "eval.samples=7", "data.batch_size=4", mix))
    model = trainer.model
    by4 = trainer.eval_set
    assert [len(i) for i in by4.indices] == [4, 3] and by4.num_samples == 7
    by2 = build_eval_set(tiny_cfg("eval.every=1", "eval.samples=7", "data.batch_size=2", mix))
    captions = [c for b in by2.batches for c in b["captions"]]
    assert captions == [c for b in by4.batches for c in b["captions"]]
    assert (image_only_fraction == 1.0) == all(c is None for c in captions)
    assert [len(i) for i in by2.indices] == [2, 2, 2, 1]
    assert torch.equal(by2.t, by4.t) and sorted(by4.t.tolist()) == [(j + 0.5) / 7 for j in range(7)]
    reference = evaluate(by4, model_losses(model))
    assert reference["eval/samples"] == 7 and len([k for k in reference if k.startswith("eval/loss_t")]) == 4
    for eval_set in (by4, by2):
        for dp in (1, 2, 3):
            parts = []  # each rank's vector: the all-reduce sums them
            shares = [copy.copy(eval_set) for _ in range(dp)]
            for r, share in enumerate(shares):  # what a launcher's rank keeps
                share.keep_share(dp, r)
            got = [evaluate(share, model_losses(model), dp=dp, dp_rank=r, all_reduce=parts.append)
                   for r, share in enumerate(shares)][0]
            if dp > 1:
                got = metrics(sum(parts), eval_set.t, eval_set.buckets)
            for key, value in reference.items():
                assert got[key] == pytest.approx(value, rel=2e-6), (eval_set.indices, dp, key)

    # the same draws are what makes it so: per-micro-batch draws give another figure
    class PerBatch(EvalSet):
        def draws(self, k):
            d = super().draws(k)
            d.indices = list(range(len(d.indices)))  # the sample's position in its batch
            return d

    moved = evaluate(PerBatch(by2.batches, by2.indices, by2.t, by2.seed), model_losses(model))
    assert abs(moved["eval/loss"] - reference["eval/loss"]) > 1e-4


def test_evaluation_leaves_training_bitwise_alone_and_resumes_the_same(tiny_cfg, tmp_path, capsys):
    """eval.every=2 with the EMA evaluated too and a sample grid every 2 steps: the training
    losses and weights are those of the run without them (the sample grid draws a null mask
    from the global RNG: the evaluation forks it). A run resumed at step 3 logs the same eval
    figures at steps 4 and 6 as the uninterrupted one, which are deterministic: evaluating the
    final weights again gives them again, and so does iomm-eval on the run's checkpoint."""
    common = ["train.steps=6", "eval.samples=6", "data.resolution=16"]
    plain = Trainer(tiny_cfg(*common), run_dir=tmp_path / "plain")
    plain.fit()
    evald = Trainer(tiny_cfg(*common, "eval.every=2", "eval.sample_every=2", "train.num_samples=2"),
                    run_dir=tmp_path / "eval")
    evald.fit()
    assert [x for _, x in plain.history] == [x for _, x in evald.history]  # bitwise
    a, b = plain.model.trainable_state_dict(), evald.model.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    lines = [json.loads(x) for x in open(tmp_path / "eval" / "metrics.jsonl")]
    evals = [x for x in lines if "eval/loss" in x]
    assert [x["step"] for x in evals] == [2, 4, 6]
    assert all(x["eval/samples"] == 6 and "eval_ema/loss" in x and x["eval_ema/loss"] != x["eval/loss"] for x in evals)
    assert sorted(p.name for p in (tmp_path / "eval" / "samples").iterdir()) == ["step_2.png", "step_4.png",
                                                                                "step_6.png"]
    again = evald.evaluate()
    assert {k: again[k] for k in evals[-1] if k.startswith("eval")} == {k: v for k, v in evals[-1].items()
                                                                        if k.startswith("eval")}
    # iomm-eval on the run's saved config and final checkpoint: the run's own figures, live and EMA
    from iomm_scale.cli import eval_main

    run = tmp_path / "eval"
    capsys.readouterr()
    eval_main(["--config", str(run / "config.yaml"), "--checkpoint", str(run), "--no-ema"])
    eval_main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "step_00000006")])
    live, ema = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert live["checkpoint"] == str(run) and ema["checkpoint"].endswith("step_00000006 (EMA weights)")
    for key, value in evals[-1].items():
        if key.startswith("eval/"):
            assert live[key] == value and ema[key] == evals[-1]["eval_ema/" + key[5:]], key

    first = Trainer(tiny_cfg(*common[1:], "train.steps=3", "eval.every=2"), run_dir=tmp_path / "resumed")
    first.fit()
    resumed = Trainer(tiny_cfg(*common, "eval.every=2", "train.resume=auto"), run_dir=tmp_path / "resumed")
    assert resumed.step == 3 and resumed.eval_history[0][0] == 2  # carried in the checkpoint
    resumed.fit()
    lines = [json.loads(x) for x in open(tmp_path / "resumed" / "metrics.jsonl")]
    # the first launch evaluated at 2 and at its last step (3); the second at 4 and 6
    assert [x["step"] for x in lines if "eval/loss" in x] == [2, 3, 4, 6]
    got = {x["step"]: x["eval/loss"] for x in lines if "eval/loss" in x}
    want = {x["step"]: x["eval/loss"] for x in evals}
    assert got[2] == want[2] and got[4] == want[4] and got[6] == want[6]


def test_raw_and_feature_held_out_shards_give_the_same_figure(tmp_path):
    """The held-out loss of the same images as raw shards and as precomputed feature shards
    (tools/precompute_features.py), same weights: equal, as training losses are."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import precompute_features
    from test_feature_shards_training import _write_raw_shard

    base = ["data.source=webdataset", "data.batch_size=4", "data.webdataset.shuffle_buffer=1",
            "data.webdataset.num_workers=0", "train.progress_bar=false", "train.num_samples=0", "train.resume=never"]

    def features(name):  # raw shard <name>-000000.tar -> feature shard feat-<name>-image-000000.tar
        assert precompute_features.main(["--config", TINY, "--out", str(tmp_path / f"feat-{name}")] + [
            f"--set={o}" for o in base + [f"data.webdataset.image_shards=[{tmp_path}/{name}-000000.tar]"]]) == 0
        return f"{tmp_path}/feat-{name}-image-000000.tar"

    _write_raw_shard(tmp_path / "train-000000.tar", n=4)
    _write_raw_shard(tmp_path / "val-000000.tar", n=6)
    ev = ["eval.every=1", "eval.samples=5"]
    raw = base + ev + [f"data.webdataset.image_shards=[{tmp_path}/train-000000.tar]",
                       f"eval.image_shards=[{tmp_path}/val-000000.tar]"]
    feat_val, feat_train = features("val"), features("train")
    with pytest.raises(ConfigError, match="also training shards"):
        load_config(TINY, base + ev + ["data.webdataset.features=true", f"data.webdataset.image_shards=[{feat_val}]",
                                       f"eval.image_shards=[{feat_val}]"])
    feat = base + ev + ["data.webdataset.features=true", f"data.webdataset.image_shards=[{feat_train}]",
                        f"eval.image_shards=[{feat_val}]"]

    raw_trainer = Trainer(load_config(TINY, raw), run_dir=tmp_path / "raw")
    feat_trainer = Trainer(load_config(TINY, feat), run_dir=tmp_path / "feat")
    assert raw_trainer.eval_set.batches[0]["keys"] == [f"photo{i:03d}" for i in range(4)]  # shard order
    assert [b["keys"] for b in feat_trainer.eval_set.batches] == [b["keys"] for b in raw_trainer.eval_set.batches]
    feat_trainer.model.load_state_dict(raw_trainer.model.state_dict())
    a, b = raw_trainer.evaluate(), feat_trainer.evaluate()
    assert a["eval/samples"] == b["eval/samples"] == 5
    for key in a:
        if key.startswith("eval"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_eval_config_errors_name_the_key(tiny_cfg, tmp_path):
    shards = ["data.source=webdataset", f'data.webdataset.image_shards=["{tmp_path}/img-{{000000..000001}}.tar"]']
    with pytest.raises(ConfigError, match=r"eval.image_shards: held-out evaluation \(eval.every > 0, iomm-eval\) on webdataset data needs"):
        load_config(TINY, [*shards, "eval.every=10"])
    with pytest.raises(ConfigError, match=r"eval.image_shards: 1 held-out shards are also training shards: "
                                          + f"{tmp_path}/img-000001.tar"):
        load_config(TINY, [*shards, "eval.every=10", f"eval.image_shards=[{tmp_path}/img-000001.tar]"])
    with pytest.raises(ConfigError, match="eval.samples: must be >= 1"):
        load_config(TINY, ["eval.samples=0"])
    with pytest.raises(ConfigError, match="for data.source: webdataset only"):
        load_config(TINY, ["eval.every=3", "eval.image_shards=[x.tar]"])
    # held-out shards that do not exist: named before any model is built
    from test_feature_shards_training import _write_raw_shard

    for s in range(2):
        _write_raw_shard(tmp_path / f"img-{s:06d}.tar", n=2)
    with pytest.raises(ConfigError, match=r"eval.image_shards: 1 of 1 shards do not exist: .*/val.tar"):
        Trainer(tiny_cfg(*shards, "eval.every=10", f"eval.image_shards=[{tmp_path}/val.tar]"), run_dir=tmp_path / "r")
    # the launchers: evaluation and mid-run sample grids under any layout (pipelines too)
    from iomm_scale.parallel.dist_trainer import split_parallel_args

    pipeline = ["parallel.pp=2", "parallel.zero_stage=1", "parallel.num_microbatches=2", "eval.every=5"]
    split_parallel_args(TINY, [*pipeline, "eval.sample_every=5"])
    split_parallel_args(TINY, ["parallel.tp=2", "parallel.zero_stage=3", "eval.sample_every=5"])


def test_bad_held_out_samples_are_skipped_and_said(tmp_path):
    """A truncated JPEG in the held-out shard is skipped like in training (the set holds the
    next good sample instead) and the start-up line says so."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
    from data_shardkit import good_jpeg, truncated_jpeg, write_shard

    from iomm_scale.train.evaluate import describe_eval

    write_shard(str(tmp_path / "img-000000.tar"), [{"__key__": f"t{i}", "jpg": good_jpeg(i)} for i in range(4)])
    write_shard(str(tmp_path / "val-000000.tar"), [{"__key__": "v0", "jpg": good_jpeg(10)},
                                                   {"__key__": "bad", "jpg": truncated_jpeg(0)},
                                                   *({"__key__": f"v{i}", "jpg": good_jpeg(10 + i)} for i in (1, 2, 3))])
    cfg = load_config(TINY, ["data.source=webdataset", f'data.webdataset.image_shards=["{tmp_path}/img-000000.tar"]',
                             "data.webdataset.min_image_size=12", "data.resolution=16", "data.batch_size=2",
                             "eval.every=5", "eval.samples=3", f'eval.image_shards=["{tmp_path}/val-000000.tar"]'])
    eval_set = build_eval_set(cfg)
    assert [k for b in eval_set.batches for k in b["keys"]] == ["v0", "v1", "v2"]
    line = describe_eval(cfg, eval_set)
    assert "eval: 3 samples of the held-out shards (1 bad samples skipped: truncated_image 1" in line, line


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_on_cuda_in_bf16_matches_cpu(tiny_cfg, tmp_path):
    """On a GPU (bf16 autocast): the draws move to the device, the CUDA generator is forked and
    left alone, and the figures equal the CPU fp32 ones for the same weights within bf16 rounding."""
    cuda = Trainer(tiny_cfg("train.device=cuda", "train.precision=bf16", "eval.every=2", "eval.samples=8",
                            "train.steps=2"), run_dir=tmp_path / "cuda")
    cuda.fit()
    before = torch.cuda.get_rng_state()
    on_gpu = cuda.evaluate()
    assert torch.equal(torch.cuda.get_rng_state(), before)
    cpu = Trainer(tiny_cfg("train.device=cpu", "eval.every=2", "eval.samples=8"), run_dir=tmp_path / "cpu")
    cpu.model.load_state_dict({k: v.cpu() for k, v in cuda.model.state_dict().items()})
    on_cpu = evaluate_model(cpu.model, cpu.eval_set, torch.device("cpu"))
    for key, value in on_cpu.items():
        if key.startswith("eval/loss"):
            assert on_gpu[key] == pytest.approx(value, rel=3e-2), key
