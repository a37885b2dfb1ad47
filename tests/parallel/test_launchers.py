"""Launcher smoke: launchers/pretrain.py under torchrun (TP=2, ZeRO-1, 2 steps), then under
the `deepspeed` launcher resuming that run's DeepSpeed checkpoint for a 3rd step."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config", "configs/tiny.yaml", "train.log_every=1", "data.batch_size=2", "data.resolution=16",
        "data.builtin.crops_per_photo=1", "parallel.tp=2", "parallel.zero_stage=1"]


def run(cmd):
    env = {**os.environ, "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


EVAL = ["eval.every=2", "eval.samples=3"]  # micro-batches of 2 and 1 held-out samples


def single_process_eval(tmp_path, weights_from: str, *overrides) -> dict:
    """iomm-train's held-out metrics (eval/ and eval_ema/) for the live and EMA weights of a
    launcher run (its --save-full copy or EMA export), on the same config without the layout."""
    from iomm_scale.config import load_config
    from iomm_scale.train.checkpoint import apply_init_weights
    from iomm_scale.train.evaluate import evaluate_model
    from iomm_scale.train.trainer import Trainer

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [*ARGS[2:-2], "train.progress_bar=false",
                                                                   "train.resume=never", *overrides])
    trainer = Trainer(cfg, run_dir=tmp_path / "single")
    out = {}
    for use_ema, prefix in ((False, "eval/"), (True, "eval_ema/")):
        apply_init_weights(trainer.model, weights_from, use_ema)
        out.update(evaluate_model(trainer.model, trainer.eval_set, trainer.device, prefix=prefix))
    return out


def assert_same_eval(line: dict, single: dict) -> None:
    keys = [k for k in single if "/loss" in k]
    assert len(keys) >= 6 and line["eval/samples"] == single["eval/samples"] == 3
    for k in keys:
        assert line[k] == pytest.approx(single[k], rel=1e-5), k


def test_torchrun_then_deepspeed_launcher_resume(tmp_path):
    """... and the held-out evaluation under TP=2 (ZeRO-1) and DP=2 (ZeRO-2) equals iomm-train's
    on the same weights."""
    run_dir = str(tmp_path / "run")
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29633",
               "launchers/pretrain.py", *ARGS, *EVAL, "--run-dir", run_dir, "train.steps=2", "train.ckpt_every=2"])
    assert "tp 2 x pp 1 x dp 1" in out and "done at step 2" in out
    assert "eval: 3 samples of the built-in images in 2 micro-batches, every 2 steps, live and EMA weights" in out
    assert out.count("[iomm] checkpoint ") == 1  # the periodic save at step 2; the final one does not re-write it
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    out = run([deepspeed, "--num_gpus", "2", "--master_port", "29634", "launchers/pretrain.py", *ARGS, *EVAL,
               "--run-dir", run_dir, "train.steps=3", "--save-full", "train.keep_checkpoints=1",
               "eval.sample_every=3"])
    assert "resumed from" in out and "done at step 3" in out
    steps = sorted(d for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.startswith("step_"))
    assert steps == ["step_00000003"]  # train.keep_checkpoints applies to the launchers too
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [x for x in lines if "eval/loss" in x]
    lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in lines] == [1, 2, 3] and [x["step"] for x in evals] == [2, 3]  # every 2 and the last
    assert all(x["loss"] == x["loss"] and x["loss"] < 10 for x in lines)
    # TP=2: the held-out figures of step 3 are iomm-train's for the --save-full weights and EMA
    assert_same_eval(evals[-1], single_process_eval(tmp_path, os.path.join(run_dir, "full"), *EVAL))
    assert abs(evals[-1]["eval_ema/loss"] - evals[-1]["eval/loss"]) > 1e-4  # the EMA really was swapped in
    # throughput as iomm-train logs it: the run's samples/s, per-device tokens and model TFLOP/s (no MFU on CPU)
    assert all(x["samples_per_s"] > 0 and x["tflops_per_device"] > 0 and x["image_tokens_per_s"] > 0 for x in lines)
    # the single-process trainer's outputs: the grids sampled in place by both TP ranks (the EMA
    # swapped in), the mid-run one of step 3 (eval.sample_every) and the end's samples.png, are
    # one process's grid from the run's EMA export, up to the last bit of a pixel
    import numpy as np
    from PIL import Image

    from iomm_scale.config import load_config
    from iomm_scale.sampling import load_trained
    from iomm_scale.train.trainer import write_sample_grid

    assert "sample grid:" in out and f"step 3: samples {run_dir}/samples/step_3.png" in out
    for png in ("samples.png", "loss_curve.png"):
        assert os.path.getsize(os.path.join(run_dir, png)) > 0
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ARGS[2:-2])
    write_sample_grid(load_trained(cfg, os.path.join(run_dir, "ema"), use_ema=True, device="cpu"), cfg, "cpu",
                      tmp_path / "single.png")
    single = np.asarray(Image.open(tmp_path / "single.png"), dtype=np.int16)
    for png in ("samples.png", "samples/step_3.png"):
        grid = np.asarray(Image.open(os.path.join(run_dir, png)), dtype=np.int16)
        assert grid.shape == single.shape and np.abs(grid - single).max() <= 1 and (grid != single).mean() < 0.01
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))

    # --save-full: the layout-free copy (TP shards joined) holds the same EMA as the export
    import torch

    from iomm_scale.train.checkpoint import read_full_parts, read_init_weights

    assert sorted(os.listdir(os.path.join(run_dir, "full"))) == ["full_pp0.pt"]
    assert read_full_parts(os.path.join(run_dir, "full"))[0]["iomm_step"] == 3
    full_ema = read_init_weights(os.path.join(run_dir, "full"), use_ema=True)[0]
    exported = torch.load(os.path.join(run_dir, "ema", "state.pt"), weights_only=False)["ema"]["shadow"]
    assert full_ema.keys() == exported.keys()
    assert all(torch.equal(full_ema[n], exported[n]) for n in exported)

    # --export: the run's newest checkpoint (step 3, TP=2) as single-device files, nothing trained,
    # the run directory left alone: the same weights, moments and EMA as the copy and export the
    # run wrote at its end
    exp = str(tmp_path / "exp")
    before = {f: os.path.getmtime(os.path.join(run_dir, f)) for f in ("config.yaml", "metrics.jsonl", "samples.png")}
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29638",
               "launchers/pretrain.py", *ARGS, "--run-dir", run_dir, "--export", exp])
    assert f"exported step 3: layout-free {exp}/full, EMA {exp}/ema" in out and "[iomm] step " not in out
    assert before == {f: os.path.getmtime(os.path.join(run_dir, f)) for f in before}
    got, want = read_full_parts(os.path.join(exp, "full"))[0], read_full_parts(os.path.join(run_dir, "full"))[0]
    assert got["iomm_step"] == 3
    for key in ("params", "exp_avg", "exp_avg_sq", "ema"):
        assert got[key].keys() == want[key].keys() and all(torch.equal(got[key][n], want[key][n]) for n in want[key])
    got = torch.load(os.path.join(exp, "ema", "state.pt"), weights_only=False)
    want = torch.load(os.path.join(run_dir, "ema", "state.pt"), weights_only=False)
    assert got["step"] == 3 and all(torch.equal(got["ema"]["shadow"][n], v) for n, v in want["ema"]["shadow"].items())
    assert all(torch.equal(got["model"][n], v) for n, v in want["model"].items())
    # nothing to export: refused before anything is built
    p = subprocess.run([sys.executable, "launchers/pretrain.py", *ARGS[:-2], "--run-dir", str(tmp_path / "new"),
                        "--export", exp], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"})
    assert p.returncode == 2 and "config error: --export" in p.stderr and "resumes none" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr

    # Stage 2 under another layout (DP=2, ZeRO-2) starts from that run's EMA export: with a
    # vanishing learning rate its own export after one step holds exactly those weights.
    import torch

    ft_dir = str(tmp_path / "finetune")
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29635",
               "launchers/finetune.py", *ARGS[:-2], "parallel.zero_stage=2", "--run-dir", ft_dir, "train.steps=1",
               f"train.init_from={run_dir}/ema", "optim.lr=1e-30", "train.num_samples=0", *EVAL])
    assert f"initialised weights from {run_dir}/ema (EMA weights)" in out
    source = torch.load(os.path.join(run_dir, "ema", "state.pt"), weights_only=False)["ema"]["shadow"]
    started = torch.load(os.path.join(ft_dir, "ema", "state.pt"), weights_only=False)["model"]
    assert source.keys() == started.keys()
    for name, value in source.items():
        torch.testing.assert_close(started[name], value, rtol=0, atol=1e-12, msg=name)
    # DP=2 (ZeRO-2): one held-out micro-batch per replica; the figures are iomm-train's for the
    # weights and EMA of the run's export (the EMA gathered from both replicas' slices)
    line = [json.loads(x) for x in open(os.path.join(ft_dir, "metrics.jsonl"))][-1]
    assert line["step"] == 1
    assert_same_eval(line, single_process_eval(tmp_path, os.path.join(ft_dir, "ema"), *EVAL))
    # resuming that tp=2 run under another layout is refused before anything is built, naming the way
    p = subprocess.run([sys.executable, "launchers/pretrain.py", *ARGS[:-2], "--run-dir", run_dir, "train.steps=4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"})
    assert p.returncode == 2 and "checkpoint error: resuming from" in p.stderr, p.stderr
    assert "saved under tp 2 x pp 1 x dp 1, ZeRO-1, this launch is tp 1 x pp 1 x dp 1, ZeRO-0" in p.stderr
    assert "--resume-full <run_dir>/full" in p.stderr and "Traceback" not in p.stderr
    # a DeepSpeed checkpoint is refused before anything is built, naming what to use instead
    p = subprocess.run([sys.executable, "launchers/finetune.py", *ARGS[:-2], "--run-dir", str(tmp_path / "x"),
                        f"train.init_from={run_dir}/checkpoints/step_00000003"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"})
    assert p.returncode == 2 and "a DeepSpeed checkpoint" in p.stderr and "<run_dir>/ema" in p.stderr, p.stderr
    assert "relaunch the run's layout with --export DIR" in p.stderr


def test_pipeline_launch_on_mixed_webdataset_shards_with_evaluation(tmp_path):
    """PP=2 on webdataset shards, image-only and captioned (lambda 0.5), with a captioned held-out
    set: the first stage gets the whole micro-batch dict (the schedule hands over only its index),
    so shards, captions and evaluation all run through a pipeline (this crashed on webdataset
    shards, and dropped the captions of the built-in mixture, before)."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
    from data_shardkit import good_jpeg, write_shard

    write_shard(str(tmp_path / "img-000000.tar"), [{"__key__": f"i{i:02d}", "jpg": good_jpeg(i)} for i in range(8)])
    for name, first in (("pairs", 8), ("val", 20)):
        write_shard(str(tmp_path / f"{name}-000000.tar"), [
            {"__key__": f"p{i:02d}", "jpg": good_jpeg(i), "txt": "a photo" + " of a thing" * (i % 3)}
            for i in range(first, first + 8)])
    run_dir = tmp_path / "run"
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29637",
               "launchers/finetune.py", *ARGS[:-2], "parallel.pp=2", "parallel.zero_stage=1", "train.grad_accum=2",
               "--run-dir", str(run_dir), "train.steps=2", "train.num_samples=0", "data.source=webdataset",
               "data.image_only_fraction=0.5", f'data.webdataset.image_shards=["{tmp_path}/img-000000.tar"]',
               f'data.webdataset.paired_shards=["{tmp_path}/pairs-000000.tar"]', "data.webdataset.num_workers=0",
               "data.webdataset.min_image_size=12", "eval.every=2", "eval.samples=4",
               f'eval.paired_shards=["{tmp_path}/val-000000.tar"]'])
    assert "tp 1 x pp 2 x dp 1" in out and "done at step 2" in out
    lines = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 2] and "eval/loss" in lines[-1] and "eval_ema/loss" in lines[-1]
    assert all(x.get("loss", 1.0) < 10 and x.get("eval/loss", 1.0) < 10 for x in lines)
    assert lines[1]["data/ok"] >= 2 * 2 * 2  # 2 steps x 2 micro-batches x 2 samples


def test_bad_layout_is_a_clear_error_before_start():
    p = subprocess.run([sys.executable, "launchers/pretrain.py", "--config", "configs/tiny.yaml", "parallel.pp=2",
                        "parallel.zero_stage=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "zero_stage: ZeRO-3 cannot be combined with pipeline parallelism" in p.stderr
    # under a launcher the world size joins the checks: every problem in one message, from one rank
    p = subprocess.run([sys.executable, "launchers/pretrain.py", "--config", "configs/tiny.yaml", "parallel.tp=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RANK": "0", "WORLD_SIZE": "2"})
    assert p.returncode == 2 and "2 problems" in p.stderr, p.stderr
    assert "world size 2 is not divisible by tp*pp = 3*1 = 3" in p.stderr and "4 attention heads" in p.stderr


def test_launcher_data_counters_and_exact_data_resume(tmp_path):
    """TP=2 x DP=2 (4 processes) on webdataset shards with planted bad samples. metrics.jsonl
    (and the offline wandb run) carry the run's per-reason counters: both replicas' shards
    summed, each replica counted once although its two TP ranks both read it. A run stopped at
    step 2 and resumed from its DeepSpeed checkpoint (each replica's data position) continues
    exactly: steps 3-4 have the uninterrupted run's losses and the counters are the same (the
    bad samples before the checkpoint are not counted twice)."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
    from data_shardkit import corrupt_png_header, good_jpeg, not_an_image, too_small_jpeg, truncated_jpeg, write_shard

    planted = [
        [{"__key__": "trunc0", "jpg": truncated_jpeg(0)}, {"__key__": "trunc1", "jpg": truncated_jpeg(1)},
         {"__key__": "html", "jpg": not_an_image(0)}, {"__key__": "small", "jpg": too_small_jpeg(0)}],
        [{"__key__": "crc", "png": corrupt_png_header(0)}, {"__key__": "empty", "jpg": b""},
         {"__key__": "noimage", "txt": "a caption without its image"}],
    ]
    for s, bad in enumerate(planted):  # bad samples first: read before the first batch is formed
        write_shard(str(tmp_path / f"img-{s:06d}.tar"),
                    bad + [{"__key__": f"good{s}_{i:02d}", "jpg": good_jpeg(i)} for i in range(12)])
    env = {**os.environ, "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}

    def launch(run_dir, *extra):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                            "29636", "launchers/pretrain.py", *ARGS, "--run-dir", str(run_dir), "data.source=webdataset",
                            f'data.webdataset.image_shards=["{tmp_path}/img-{{000000..000001}}.tar"]',
                            "data.webdataset.num_workers=0", "data.webdataset.shuffle_buffer=1",
                            "data.webdataset.min_image_size=12", "data.webdataset.error_budget=1.0",
                            "train.log_every=1", "train.num_samples=0", *extra],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout, [json.loads(x) for x in open(run_dir / "metrics.jsonl")]

    out, straight = launch(tmp_path / "straight", "train.steps=4", "train.wandb.enabled=true", "train.wandb.mode=offline")
    assert "tp 2 x pp 1 x dp 2" in out
    line = straight[-1]
    reasons = {k.removeprefix("data/reasons/"): v for k, v in line.items() if k.startswith("data/reasons/") and v}
    assert reasons == {"truncated_image": 2, "not_an_image": 1, "too_small": 1, "corrupt_header": 1,
                       "empty_payload": 1, "missing_image": 1}
    assert line["data/bad"] == 7 and line["data/ok"] >= 2 * 4 * 2  # 2 replicas x 4 steps x batch 2
    assert line["data/batches"] >= 8 and {u for u, _ in line["data/worst_shards"]} == {
        f"{tmp_path}/img-{s:06d}.tar" for s in range(2)}
    runs = list((tmp_path / "straight" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(f.suffix == ".wandb" for f in runs[0].iterdir())  # rank 0's only

    launch(tmp_path / "stopped", "train.steps=2", "train.ckpt_every=2")
    out, resumed = launch(tmp_path / "stopped", "train.steps=4")
    assert "resumed from" in out and [x["step"] for x in resumed] == [1, 2, 3, 4]
    assert [x["loss"] for x in resumed[2:]] == [x["loss"] for x in straight[2:]]  # bitwise
    data = {k: v for k, v in straight[-1].items() if k.startswith("data/")}
    assert {k: v for k, v in resumed[-1].items() if k.startswith("data/")} == data


def test_a_diverging_launch_checkpoints_and_stops_every_rank(tmp_path):
    """train/nonfinite.py under launchers/pretrain.py (DP=2, ZeRO-2): lr 1e30 overflows the weights
    at step 1, so steps 2 and 3 have NaN losses. DeepSpeed skips both updates on both ranks, the
    warnings name the samples of both replicas, and with train.max_nonfinite_steps 1 the run saves
    a checkpoint at step 3 and every rank exits with status 4 (torchrun then reports the failure)."""
    run_dir = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("parallel.")] + ["parallel.zero_stage=2", "optim.lr=1e30",
                                                                 "optim.warmup_steps=0", "train.steps=10",
                                                                 "train.max_nonfinite_steps=1", "optim.ema_decay=0.9"]
    env = {**os.environ, "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29637", "launchers/pretrain.py", *args, "--run-dir", str(run_dir)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "exitcode  : 4" in out, out[-3000:]  # torchrun's failure report names the children's status
    assert out.count("training error: steps 2-3: 2 steps in a row with a non-finite loss or gradient norm "
                     "(train.max_nonfinite_steps: 1); stopped. No update was applied since step 1") == 1  # rank 0
    warning = next(line for line in out.splitlines() if "step 2: loss nan" in line)
    assert warning.count("photo") == 2 * 2  # micro-batch 2 on each of the two replicas
    lines = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [(x["step"], x["nonfinite_steps"], x["applied"]) for x in lines] == [(1, 0, True), (2, 1, False),
                                                                                 (3, 2, False)]
    tag = run_dir / "checkpoints" / "step_00000003"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    import torch

    client = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert client["nonfinite"] == {"total": 2, "streak": [2, 3]} and client["iomm_step"] == 3
