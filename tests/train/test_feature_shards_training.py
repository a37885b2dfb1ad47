"""Training on precomputed feature shards gives the same losses as training on the raw
image shards they were made from (same seed, hence the same t, noise, dropout and MIM masks)."""

import os
import sys

import torch
import webdataset as wds
from PIL import Image

from iomm_scale.config import load_config
from iomm_scale.data.builtin import photo_crops
from iomm_scale.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _write_raw_shard(path, n=8, res=32):
    import io

    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for i, img in enumerate(photo_crops(res, 1)[:n]):
            arr = ((img.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")  # lossless: features see exactly these pixels
            w.write({"__key__": f"photo{i:03d}", "png": buf.getvalue()})


def test_feature_shards_train_exactly_like_raw_images(tmp_path):
    import precompute_features

    raw = tmp_path / "raw-000000.tar"
    _write_raw_shard(raw)
    common = ["data.source=webdataset", "data.batch_size=4", "data.webdataset.shuffle_buffer=1",
              "data.webdataset.num_workers=0", "train.progress_bar=false", "train.num_samples=0",
              "train.resume=never", "train.steps=3"]
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    cfg_raw = load_config(tiny, common + [f"data.webdataset.image_shards=[{raw}]"])
    assert precompute_features.main(["--config", tiny, "--out", str(tmp_path / "feat")]
                                    + [f"--set={o}" for o in common + [f"data.webdataset.image_shards=[{raw}]"]]) == 0
    feat = tmp_path / "feat-image-000000.tar"
    assert feat.exists()
    cfg_feat = load_config(tiny, common + [f"data.webdataset.image_shards=[{feat}]", "data.webdataset.features=true"])

    torch.set_num_threads(1)
    runs = []
    for cfg, name in ((cfg_raw, "raw"), (cfg_feat, "feat")):
        trainer = Trainer(cfg, run_dir=tmp_path / name)
        batch = next(trainer.loader)
        assert ("pixels" in batch) == (name == "raw") and ("latents" in batch) == (name == "feat")
        trainer = Trainer(cfg, run_dir=tmp_path / f"{name}2")  # fresh: same seed, same first batch
        for _ in range(3):
            trainer.train_step()
        runs.append([loss for _, loss in trainer.history])
        if name == "feat":  # the sample grid from feature batches: latents decoded, vision features as condition
            trainer.cfg.train.num_samples = 2
            trainer.write_outputs()
            from PIL import Image as PILImage

            grid = PILImage.open(tmp_path / "feat2" / "samples.png")
            assert grid.size[1] > grid.size[0] / 2  # two rows of two images
    raw_losses, feat_losses = runs
    # Same pixels -> same latents and vision features (float32 storage); tolerance covers
    # summation-order differences only.
    torch.testing.assert_close(torch.tensor(feat_losses), torch.tensor(raw_losses), rtol=1e-6, atol=0)


def test_paired_feature_shards_keep_every_caption(tmp_path, capsys):
    """A fine-tuning config (lambda 0.5) precomputes its paired shards with every caption: the
    mixture withholds captions per step at training time, never once for good in the shard.
    The same command again finds the pass complete (its progress file) and redoes nothing; with
    another --max-count it is refused (exit 2) naming the difference."""
    import io
    import tarfile

    import precompute_features

    raw = tmp_path / "pairs-000000.tar"
    with wds.TarWriter(str(raw), encoder=False, mtime=0) as w:
        for i, img in enumerate(photo_crops(32, 1)[:8]):
            arr = ((img.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            w.write({"__key__": f"pair{i:03d}", "png": buf.getvalue(), "txt": f"caption number {i}".encode()})
    overrides = ["data.source=webdataset", "data.batch_size=4", "data.image_only_fraction=0.5",
                 f"data.webdataset.paired_shards=[{raw}]", "data.webdataset.num_workers=0"]
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    assert precompute_features.main(["--config", tiny, "--out", str(tmp_path / "feat")]
                                    + [f"--set={o}" for o in overrides]) == 0
    with tarfile.open(tmp_path / "feat-paired-000000.tar") as tar:
        captions = {m.name.split(".")[0]: tar.extractfile(m).read().decode()
                    for m in tar.getmembers() if m.name.endswith(".txt")}
    assert captions == {f"pair{i:03d}": f"caption number {i}" for i in range(8)}
    assert "[rank 0] paired: feat-paired-000000.tar done: 8 samples so far" in capsys.readouterr().out
    args = ["--config", tiny, "--out", str(tmp_path / "feat")] + [f"--set={o}" for o in overrides]
    assert precompute_features.main(args) == 0
    out = capsys.readouterr().out
    assert "paired: already complete" in out and "paired: 8 samples -> 1 shards" in out
    assert precompute_features.main(args + ["--max-count", "3"]) == 2
    assert "max_count: 1000 -> 3" in capsys.readouterr().err


def test_precompute_under_torchrun_prints_one_config_with_every_rank(tmp_path):
    """Two processes each encode their share of the shards; rank 0 prints one training config
    listing both ranks' feature shards, with the resolution they were made for."""
    import json
    import subprocess

    for i in range(2):
        _write_raw_shard(tmp_path / f"raw-{i:06d}.tar", n=2)
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    sets = ["data.source=webdataset", "data.batch_size=2", "data.webdataset.num_workers=0",
            f'data.webdataset.image_shards=["{tmp_path}/raw-{{000000..000001}}.tar"]']
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641",
                        os.path.join(ROOT, "tools", "precompute_features.py"), "--config", tiny,
                        "--out", str(tmp_path / "feat"), *[f"--set={s}" for s in sets]],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("config for training") == 1, p.stdout
    block = json.loads(p.stdout[p.stdout.index("{", p.stdout.index("config for training")):])
    assert block["data"]["resolution"] == 32 and block["data"]["source"] == "webdataset"
    shards = block["data"]["webdataset"]["image_shards"]
    assert sorted(shards) == [str(tmp_path / "feat-image-r000-000000.tar"), str(tmp_path / "feat-image-r001-000000.tar")]


def test_feature_shards_of_other_encoders_are_refused_before_training(tmp_path, caplog):
    """precompute_features records the encoders in every sample; a run whose VAE or vision tower
    differs (or whose vision tokens have another shape) stops before its first step with an
    error naming the shard; check_feature_encoders: false takes them; shards written without a
    record get a warning; within a shard list, samples of other encoders are skipped and counted
    feature_mismatch exactly."""
    import json
    import logging
    import tarfile

    import precompute_features
    import pytest

    from iomm_scale.config import ConfigError
    from iomm_scale.data.features import write_feature_shards

    raw = tmp_path / "raw-000000.tar"
    _write_raw_shard(raw)
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    common = ["data.source=webdataset", "data.batch_size=4", "data.webdataset.shuffle_buffer=1",
              "data.webdataset.num_workers=0", "train.progress_bar=false", "train.num_samples=0", "train.resume=never"]
    for seed in (0, 1):  # train.seed seeds the tiny random MLLM: seed 1 is another vision tower
        assert precompute_features.main(["--config", tiny, "--out", str(tmp_path / f"seed{seed}")] + [
            f"--set={o}" for o in common + [f"data.webdataset.image_shards=[{raw}]", f"train.seed={seed}"]]) == 0
    mine, theirs = tmp_path / "seed0-image-000000.tar", tmp_path / "seed1-image-000000.tar"
    with tarfile.open(mine) as tar:
        record = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert set(record["encoders"]) == {"vae", "vision"} and record["resize_filter"] == "bicubic"

    def trainer(shards, *extra):
        cfg = load_config(tiny, common + ["data.webdataset.features=true", "data.webdataset.error_budget=1.0",
                                          f"data.webdataset.image_shards=[{', '.join(map(str, shards))}]", *extra])
        return Trainer(cfg, run_dir=tmp_path / "run")

    trainer([mine])  # its own encoders: accepted
    with pytest.raises(ConfigError, match=rf"(?s)image_shards: {theirs}: made by other encoders: vision .*check_feature_encoders"):
        trainer([theirs])
    with pytest.raises(ConfigError, match=r"other encoders: vae [0-9a-f]{16} \(this run's: [0-9a-f]{16}\)\n"):
        trainer([mine], "model.vae.scaling_factor=2.0")
    trainer([theirs], "data.webdataset.check_feature_encoders=false")
    # the parallel launchers refuse them too, on every rank, once the model is built (2 processes, DP=2)
    import subprocess

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29647", "launchers/pretrain.py", "--config", tiny, "--run-dir", str(tmp_path / "dist"),
                        *common, "data.webdataset.features=true", f"data.webdataset.image_shards=[{theirs}]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_BUILD_OPS": "0"})
    assert p.returncode != 0 and "config error: " in p.stderr, p.stderr[-3000:]
    assert f"{theirs}: made by other encoders: vision" in p.stderr and p.stderr.count("config error: ") == 1
    # another vision hidden size: refused by shape even with the encoder check off
    with pytest.raises(ConfigError, match=r"vision features are \[16, 64\], this run.s vision tower makes \[16, 32\]"):
        trainer([mine], "data.webdataset.check_feature_encoders=false", "model.conditioner.mllm.tiny.text_hidden=32")

    # shards without a record (written before records were kept): a warning, and they train
    old = tmp_path / "old-000000.tar"
    with tarfile.open(mine) as tar:
        arrays = {}
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            arrays.setdefault(key, {})[ext] = tar.extractfile(m).read()
    import io

    import numpy as np

    write_feature_shards([{"key": k, "latents": np.load(io.BytesIO(v["latents.npy"])),
                           "vision_features": np.load(io.BytesIO(v["vision.npy"])), "resolution": 32}
                          for k, v in arrays.items()], str(tmp_path / "old-%06d.tar"))
    with caplog.at_level(logging.WARNING, logger="iomm_scale.data"):
        t = trainer([old])
    assert any("without a record of the encoders" in r.getMessage() for r in caplog.records)
    t.train_step()

    # a list whose first shard is fine: the other encoders' samples are skipped and counted
    t = trainer([mine, theirs], "data.webdataset.epochs=1")
    keys = [k for batch in t.loader for k in batch["keys"]]
    assert sorted(keys) == sorted(arrays)  # seed 0's 8 samples, each once
    assert {r: n for r, n in t.loader.stats()["reasons"].items() if n} == {"feature_mismatch": 8}
