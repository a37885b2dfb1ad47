"""Feature shards: written from tensors, read back exactly; bad feature samples counted."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_shardkit import write_clean_shards, write_shard
from iomm_scale.data import WebDatasetConfig, build_webdataset_loader, unit_pixels, write_feature_shards
from iomm_scale.data.features import precompute_feature_shards

R = 32


def np_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def feature_samples(n, caption_every=3, seed=0, lat_shape=(4, 4, 4), vis_shape=(6, 8)):
    g = torch.Generator().manual_seed(seed)
    return [{"key": f"f{i:04d}", "latents": torch.randn(*lat_shape, generator=g),
             "vision_features": torch.randn(*vis_shape, generator=g),
             "caption": f"caption {i}" if i % caption_every == 0 else None, "resolution": R} for i in range(n)]


def by_key(loader):
    out = {}
    for batch in loader:
        assert set(batch) == {"latents", "vision_features", "captions", "keys"}
        for i, k in enumerate(batch["keys"]):
            out[k] = (batch["latents"][i], batch["vision_features"][i], batch["captions"][i])
    return out


@pytest.mark.parametrize("dtype, tol", [("float32", 0.0), ("float16", 2e-3)])
def test_feature_shards_round_trip(tmp_path, dtype, tol):
    samples = feature_samples(30)
    summary = write_feature_shards(samples, str(tmp_path / "feat-%06d.tar"), max_count=8, dtype=dtype)
    assert summary["samples"] == 30 and len(summary["shards"]) == 4
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / "feat-{000000..000003}.tar")], features=True, num_workers=2,
                           epochs=1, shuffle_buffer=5)
    got = by_key(build_webdataset_loader(cfg, R, 4, 0, 1, 0))
    assert sorted(got) == [s["key"] for s in samples]
    for s in samples:
        lat, vis, caption = got[s["key"]]
        assert lat.dtype == vis.dtype == getattr(torch, dtype) and lat.shape == (4, 4, 4) and vis.shape == (6, 8)
        assert torch.allclose(lat.float(), s["latents"], rtol=tol, atol=tol)
        assert torch.allclose(vis.float(), s["vision_features"], rtol=tol, atol=tol)
        assert caption is None  # read as image-only shards
    # as paired shards only the captioned samples qualify; the rest are counted missing_caption
    paired = build_webdataset_loader(WebDatasetConfig(paired_shards=cfg.image_shards, features=True,
                                                      image_only_fraction=0.0, num_workers=0, epochs=1,
                                                      error_budget=1.0), R, 4, 0, 1, 0)
    got = by_key(paired)
    assert {k: c for k, (_, _, c) in got.items()} == {s["key"]: s["caption"] for s in samples if s["caption"]}
    assert paired.stats()["reasons"]["missing_caption"] == 20


def test_bad_feature_samples_are_counted(tmp_path):
    write_feature_shards(feature_samples(6), str(tmp_path / "ok-%06d.tar"))
    other_res = feature_samples(2, seed=1)
    for s in other_res:
        s["resolution"], s["key"] = 64, "r" + s["key"]
    write_feature_shards(other_res, str(tmp_path / "res-%06d.tar"))
    nan = io.BytesIO()
    np.save(nan, np.full((4, 4, 4), np.nan, dtype=np.float32))
    inf16 = io.BytesIO()
    np.save(inf16, np.array([[1.0, np.inf]] * 6, dtype=np.float16))
    good_vis = io.BytesIO()
    np.save(good_vis, np.zeros((6, 8), dtype=np.float32))
    write_shard(str(tmp_path / "bad-000000.tar"), [
        {"__key__": "garbage", "latents.npy": b"\x93NUMPY garbage", "vision.npy": good_vis.getvalue()},
        {"__key__": "nan", "latents.npy": nan.getvalue(), "vision.npy": good_vis.getvalue()},
        {"__key__": "nolatents", "vision.npy": good_vis.getvalue()},
        {"__key__": "inf16", "latents.npy": np_bytes(np.zeros((4, 4, 4), np.float16)), "vision.npy": inf16.getvalue()},
    ])
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / f"{p}-000000.tar") for p in ("ok", "res", "bad")],
                           features=True, num_workers=0, epochs=1, error_budget=1.0)
    loader = build_webdataset_loader(cfg, R, 4, 0, 1, 0)
    assert sorted(by_key(loader)) == [f"f{i:04d}" for i in range(6)]
    reasons = {r: n for r, n in loader.stats()["reasons"].items() if n}
    assert reasons == {"feature_mismatch": 2, "bad_features": 3, "missing_image": 1}


def test_feature_batches_group_equal_shapes(tmp_path):
    samples = feature_samples(6) + [dict(s, key="w" + s["key"]) for s in feature_samples(6, lat_shape=(4, 4, 6))]
    write_feature_shards(samples, str(tmp_path / "mixed-%06d.tar"))
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / "mixed-000000.tar")], features=True, num_workers=0, epochs=1,
                           shuffle_buffer=12)
    shapes = [tuple(b["latents"].shape) for b in build_webdataset_loader(cfg, R, 3, 0, 1, 0)]
    assert sorted(shapes) == [(3, 4, 4, 4)] * 2 + [(3, 4, 4, 6)] * 2


def test_precompute_writes_what_the_encoders_return(tmp_path):
    """The precompute pass on real image shards with real (weight-free) encoders: space-to-
    depth latents and patch tokens, as the pixel VAE and a patch embedding would give."""
    pattern, keys = write_clean_shards(tmp_path, 3, 7, prefix="raw")
    raw = WebDatasetConfig(paired_shards=[pattern], image_only_fraction=0.0, num_workers=0, epochs=1, shuffle_buffer=1)

    def latents(px):
        return F.pixel_unshuffle(px, 4)

    def vision(px):
        return F.pixel_unshuffle(px, 8).flatten(2).transpose(1, 2)

    summary = precompute_feature_shards(build_webdataset_loader(raw, R, 4, 0, 1, 0), latents, vision,
                                        str(tmp_path / "feat-%06d.tar"), R, max_count=10)
    assert summary["samples"] == 21 and summary["stats"]["ok"] == 21
    expected = {}
    for batch in build_webdataset_loader(raw, R, 4, 0, 1, 0):
        for i, k in enumerate(batch["keys"]):
            px = unit_pixels(batch["pixels"][i:i + 1])
            expected[k] = (latents(px)[0], vision(px)[0],
                           batch["captions"][i])
    feat = WebDatasetConfig(paired_shards=[str(tmp_path / "feat-{000000..000002}.tar")], features=True,
                            image_only_fraction=0.0, num_workers=0, epochs=1)
    got = by_key(build_webdataset_loader(feat, R, 4, 0, 1, 0))
    assert sorted(got) == sorted(keys)
    for k, (lat, vis, caption) in got.items():
        assert torch.equal(lat, expected[k][0]) and torch.equal(vis, expected[k][1]) and caption == expected[k][2]
        assert lat.shape == (48, 8, 8) and vis.shape == (16, 192)


def test_batch_memory_is_reused_only_when_released(tmp_path):
    """The in-process loader recycles a batch's memory (BatchPool) once nothing refers to it:
    batches dropped at once share a few buffers and still hold exactly the written samples;
    batches kept alive are never overwritten. Feature and raw-pixel batches."""
    samples = {s["key"]: s for s in feature_samples(40)}
    write_feature_shards(list(samples.values()), str(tmp_path / "feat-%06d.tar"))
    pattern, _ = write_clean_shards(tmp_path, 2, 20)
    for kind, cfg in (("features", WebDatasetConfig(image_shards=[str(tmp_path / "feat-000000.tar")], features=True,
                                                    num_workers=0, epochs=1, shuffle_buffer=8)),
                      ("pixels", WebDatasetConfig(image_shards=[pattern], num_workers=0, epochs=1, shuffle_buffer=8))):
        def content(batch):
            if kind == "features":
                for i, k in enumerate(batch["keys"]):  # exactly what was written (float32 shards)
                    assert torch.equal(batch["latents"][i], samples[k]["latents"])
                    assert torch.equal(batch["vision_features"][i], samples[k]["vision_features"])
                return {k: batch["latents"][i].sum().item() for i, k in enumerate(batch["keys"])}
            return {k: batch["pixels"][i].double().sum().item() for i, k in enumerate(batch["keys"])}

        dropped, buffers = {}, set()
        for batch in build_webdataset_loader(cfg, R, 4, 0, 1, 0):
            dropped.update(content(batch))
            buffers.add(batch["latents" if kind == "features" else "pixels"].data_ptr())
            del batch
        assert len(dropped) == 40 and len(buffers) < 10, (kind, len(buffers))  # 10 batches, a few buffers
        kept = list(build_webdataset_loader(cfg, R, 4, 0, 1, 0))
        assert len({b["latents" if kind == "features" else "pixels"].data_ptr() for b in kept}) == 10, kind
        held = {}
        for batch in kept:  # checked after the whole epoch: nothing was written over
            held.update(content(batch))
        assert held == dropped, kind
