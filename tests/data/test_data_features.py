"""Feature shards: written from tensors, read back exactly; bad feature samples counted."""

import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_shardkit import write_clean_shards, write_shard
from iomm_scale.data import WebDatasetConfig, build_webdataset_loader, unit_pixels, write_feature_shards
from iomm_scale.data.errors import BadSample
from iomm_scale.data.features import all_finite, feature_arrays, precompute_feature_shards

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
    fortran = io.BytesIO()
    np.save(fortran, np.asfortranarray(np.arange(64, dtype=np.float32).reshape(4, 4, 4)))
    fortran = fortran.getvalue()
    with pytest.raises(BadSample, match="Fortran"):  # the streamed (bytes) path too
        feature_arrays({"latents.npy": fortran, "vision.npy": good_vis.getvalue()}, R)
    write_shard(str(tmp_path / "bad-000000.tar"), [
        {"__key__": "garbage", "latents.npy": b"\x93NUMPY garbage", "vision.npy": good_vis.getvalue()},
        {"__key__": "nan", "latents.npy": nan.getvalue(), "vision.npy": good_vis.getvalue()},
        {"__key__": "nolatents", "vision.npy": good_vis.getvalue()},
        {"__key__": "inf16", "latents.npy": np_bytes(np.zeros((4, 4, 4), np.float16)), "vision.npy": inf16.getvalue()},
        {"__key__": "fortran", "latents.npy": fortran, "vision.npy": good_vis.getvalue()},  # would read scrambled
    ])
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / f"{p}-000000.tar") for p in ("ok", "res", "bad")],
                           features=True, num_workers=0, epochs=1, error_budget=1.0)
    loader = build_webdataset_loader(cfg, R, 4, 0, 1, 0)
    assert sorted(by_key(loader)) == [f"f{i:04d}" for i in range(6)]
    reasons = {r: n for r, n in loader.stats()["reasons"].items() if n}
    assert reasons == {"feature_mismatch": 2, "bad_features": 4, "missing_image": 1}


def test_finite_check_of_other_dtypes_strided_and_empty_tensors():
    """(Every float16 / bfloat16 / float32 bit pattern: tests/data/test_native.py.)"""
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.float64))
    assert all_finite(torch.tensor([1.0, -2.0], dtype=torch.float64))
    strided = torch.zeros(4, 6, dtype=torch.float16)
    strided[1, 3] = float("-inf")
    for native in (True, False):
        assert all_finite(strided[:, :3], native=native) and not all_finite(strided[:, 3:], native=native)
        assert all_finite(strided[:0], native=native)


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


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_memory_is_reused_only_when_released(tmp_path, monkeypatch, workers):
    """Batch memory is recycled once nothing refers to it: in-process by BatchPool, from
    DataLoader worker processes by SharedBatchPool (shared-memory buffers handed back by the
    main process). Batches dropped at once share a few buffers and still hold exactly the
    written samples; batches kept alive are never overwritten. Feature and raw-pixel batches,
    3 epochs of 10 batches."""
    from iomm_scale.data import stream

    allocations = torch.zeros(1, dtype=torch.int64).share_memory_()  # counted in the workers too (forked)
    alloc = stream._alloc

    def counted_alloc(*args, **kwargs):
        allocations[0] += 1
        return alloc(*args, **kwargs)

    monkeypatch.setattr(stream, "_alloc", counted_alloc)
    samples = {s["key"]: s for s in feature_samples(40)}
    write_feature_shards(list(samples.values()), str(tmp_path / "feat-%06d.tar"))
    pattern, _ = write_clean_shards(tmp_path, 2, 20)
    for kind, cfg in (("features", WebDatasetConfig(image_shards=[str(tmp_path / "feat-000000.tar")], features=True,
                                                    num_workers=workers, epochs=3, shuffle_buffer=8)),
                      ("pixels", WebDatasetConfig(image_shards=[pattern], num_workers=workers, epochs=3,
                                                  shuffle_buffer=8))):
        def content(batch):
            if kind == "features":
                for i, k in enumerate(batch["keys"]):  # exactly what was written (float32 shards)
                    assert torch.equal(batch["latents"][i], samples[k]["latents"])
                    assert torch.equal(batch["vision_features"][i], samples[k]["vision_features"])
                return [(k, batch["latents"][i].sum().item()) for i, k in enumerate(batch["keys"])]
            return [(k, batch["pixels"][i].double().sum().item()) for i, k in enumerate(batch["keys"])]

        name = "latents" if kind == "features" else "pixels"
        per_batch = 2 if kind == "features" else 1
        dropped = []
        allocations[0] = 0
        for batch in build_webdataset_loader(cfg, R, 4, 0, 1, 0):
            dropped += content(batch)
            del batch
        # 30 batches in a few buffers: in-process up to 4 per shape; a worker's up to
        # prefetch_factor + 2 batches
        assert len(dropped) == 120 and int(allocations[0]) <= max(1, workers) * 4 * per_batch, \
            (kind, int(allocations[0]))
        allocations[0] = 0
        kept = list(build_webdataset_loader(cfg, R, 4, 0, 1, 0))
        assert len({b[name].data_ptr() for b in kept}) == 30 and int(allocations[0]) >= 30 * per_batch, kind
        held = []
        for batch in kept:  # checked after all three epochs: nothing was written over
            held += content(batch)
        assert sorted(held) == sorted(dropped), kind


def _padded_npy(arr, header_bytes: int) -> bytes:
    """A valid .npy (format 1.0) whose header dict is spread over `header_bytes` (spaces after
    its first entry): longer than what a FileSpan reads first."""
    raw = np_bytes(arr)
    hlen = int.from_bytes(raw[8:10], "little")
    header = raw[10:10 + hlen].rstrip(b"\n ")
    first = header.index(b", ") + 2
    header = header[:first] + b" " * (header_bytes - 11 - len(header)) + header[first:] + b"\n"
    return raw[:8] + len(header).to_bytes(2, "little") + header + raw[10 + hlen:]


@pytest.mark.parametrize("preadv", [True, False])
def test_local_shards_read_by_span_equal_streamed_bytes(tmp_path, monkeypatch, preadv):
    """Local shards hand feature members out as FileSpans (pread straight into the batch;
    seek + read where os.preadv is missing); streamed ones (pipe:) as bytes. Both give the
    same values for every stored form: float16, float32, float64 and big-endian (converted
    to float32) and a long .npy header."""
    import os

    from iomm_scale.data.features import feature_arrays
    if not preadv:
        monkeypatch.delattr(os, "preadv")
    from iomm_scale.data.shards import FileSpan, read_shard

    rng = np.random.default_rng(0)
    lat = rng.standard_normal((4, 4, 4))
    forms = {"f16": lambda a: np_bytes(a.astype(np.float16)), "f32": lambda a: np_bytes(a.astype(np.float32)),
             "f64": np_bytes, "be32": lambda a: np_bytes(a.astype(">f4")),
             "long": lambda a: _padded_npy(a.astype(np.float32), 384)}
    path = str(tmp_path / "forms-000000.tar")
    write_shard(path, [{"__key__": k, "latents.npy": f(lat), "vision.npy": f(lat[0])} for k, f in forms.items()])
    local = list(read_shard(path, views=("latents.npy", "vision.npy")))
    streamed = list(read_shard(f"pipe:cat {path}", views=("latents.npy", "vision.npy")))
    assert all(isinstance(s["latents.npy"], FileSpan) for s in local)
    assert all(isinstance(s["latents.npy"], bytes) for s in streamed)
    for a, b in zip(local, streamed):
        (la, va), (lb, vb) = feature_arrays(a, None), feature_arrays(b, None)
        assert (la.shape, la.dtype, va.shape) == (lb.shape, lb.dtype, vb.shape) == (
            (4, 4, 4), torch.float16 if a["__key__"] == "f16" else torch.float32, (4, 4))
        slot = torch.full(la.shape, -7.0, dtype=la.dtype)
        assert torch.equal(la.into(slot), lb.tensor()) and torch.equal(va.tensor(), vb.tensor())
        assert torch.allclose(lb.tensor().double(), torch.from_numpy(lat), atol=2e-3, rtol=2e-3)


def test_span_of_a_shrunk_shard_is_a_bad_sample(tmp_path):
    """A shard file cut short after its members were listed: reading a span gives a counted
    bad sample (bad_features), never a crash or a silently short array."""
    from iomm_scale.data.errors import BadSample
    from iomm_scale.data.features import feature_arrays
    from iomm_scale.data.shards import read_shard

    write_feature_shards(feature_samples(3, vis_shape=(64, 64)), str(tmp_path / "feat-%06d.tar"))
    path = str(tmp_path / "feat-000000.tar")
    samples = list(read_shard(path, views=("latents.npy", "vision.npy")))
    lat, vis = feature_arrays(samples[-1], R)  # headers read
    with open(path, "r+b") as f:
        f.truncate(samples[-1]["vision.npy"].offset + 1000)
    lat.into(torch.empty(lat.shape, dtype=lat.dtype), check=True)  # before the cut: fine
    for check in (False, True):  # a plain read; a read and check (by the C helper when built)
        with pytest.raises(BadSample) as err:
            vis.into(torch.empty(vis.shape, dtype=vis.dtype), check=check)
        assert err.value.reason == "bad_features" and "short read" in str(err.value)


def test_feature_spec_counts_samples_of_other_encoders_and_shapes(tmp_path):
    """A loader given the run's FeatureSpec skips and counts, as feature_mismatch, exactly the
    samples recorded as made by other encoders or with other latent channels / vision shapes;
    samples without a record, or with the run's, are kept."""
    from iomm_scale.data.features import FeatureSpec

    mine, theirs = {"vae": "a" * 16, "vision": "b" * 16}, {"vae": "a" * 16, "vision": "c" * 16}
    groups = {"mine": (mine, (4, 4, 4), (6, 8), 5), "unrecorded": (None, (4, 4, 4), (6, 8), 3),
              "theirs": (theirs, (4, 4, 4), (6, 8), 4), "channels": (mine, (8, 4, 4), (6, 8), 2),
              "tokens": (mine, (4, 4, 4), (5, 8), 3)}
    samples = []
    for name, (enc, lat, vis, n) in groups.items():
        for s in feature_samples(n, lat_shape=lat, vis_shape=vis, seed=len(samples)):
            samples.append(dict(s, key=f"{name}{s['key']}", meta={"encoders": enc} if enc else None))
    write_feature_shards(samples, str(tmp_path / "spec-%06d.tar"))
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / "spec-000000.tar")], features=True, num_workers=2, epochs=1,
                           error_budget=1.0)
    spec = FeatureSpec(encoders=mine, latent_channels=4, vision_shape=(6, 8))
    loader = build_webdataset_loader(cfg, R, 4, 0, 1, 0, feature_spec=spec)
    kept = sorted(by_key(loader))
    assert kept == sorted(s["key"] for s in samples if s["key"].startswith(("mine", "unrecorded")))
    assert {r: n for r, n in loader.stats()["reasons"].items() if n} == {"feature_mismatch": 4 + 2 + 3}
    with pytest.raises(BadSample, match=r"other encoders: vision c{16} \(this run's: b{16}\)"):
        feature_arrays({"latents.npy": np_bytes(np.zeros((4, 4, 4), np.float32)),
                        "vision.npy": np_bytes(np.zeros((6, 8), np.float32)),
                        "json": b'{"resolution": 32, "encoders": {"vae": "' + b"a" * 16 + b'", "vision": "'
                                + b"c" * 16 + b'"}}'}, R, spec)
    # without a spec (library use) nothing but the resolution is checked
    assert len(by_key(build_webdataset_loader(cfg, R, 4, 0, 1, 0))) == len(samples)


def test_encoder_fingerprint_follows_the_encoders_not_the_language_model():
    """The digest changes with any VAE or vision-tower weight and the VAE's normalisation, not
    with a language-model weight or the dtype the encoders were loaded in."""
    import os

    from iomm_scale.config import load_config
    from iomm_scale.data.features import encoder_fingerprint
    from iomm_scale.iomm import build_iomm

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                        "tiny.yaml")
    model = build_iomm(load_config(tiny, ["model.vae.type=autoencoder_kl", "model.vae.random_init=true",
                                          "model.generator.in_channels=64"]), "cpu")
    base = encoder_fingerprint(model.vae, model.conditioner)
    assert set(base) == {"vae", "vision"} and all(len(v) == 16 for v in base.values())
    mllm = model.conditioner.mllm
    lm = next(p for n, p in mllm.named_parameters() if "language_model" in n)
    vit = next(p for n, p in mllm.named_parameters() if "vision_tower" in n and p.dim() == 2)
    with torch.no_grad():
        lm.add_(1.0)
        assert encoder_fingerprint(model.vae, model.conditioner) == base
        vit[0, 0] += 1.0  # the first value is always among the sampled ones
        changed = encoder_fingerprint(model.vae, model.conditioner)
        assert changed["vision"] != base["vision"] and changed["vae"] == base["vae"]
        vit[0, 0] -= 1.0
        mllm.to(torch.bfloat16)  # the same weights in another dtype: the same encoders
        assert encoder_fingerprint(model.vae, model.conditioner) == base
        model.vae.shift += 0.5
        assert encoder_fingerprint(model.vae, model.conditioner)["vae"] != base["vae"]
        model.vae.shift -= 0.5
        next(model.vae.parameters()).view(-1)[0] += 1.0
        assert encoder_fingerprint(model.vae, model.conditioner)["vae"] != base["vae"]


def _raw_shards_with_a_bad_sample(folder) -> str:
    from data_shardkit import good_jpeg, truncated_jpeg, write_shard

    for s in range(3):
        write_shard(str(folder / f"raw-{s:06d}.tar"),
                    [{"__key__": f"raw{s}{j}", "jpg": truncated_jpeg(j) if (s, j) == (1, 3) else good_jpeg(7 * s + j),
                      "txt": f"photo {s} {j}"} for j in range(7)])
    return str(folder / "raw-{000000..000002}.tar")


_KILLED_PASS = """
import os, sys
import torch.nn.functional as F
from iomm_scale.data import WebDatasetConfig, build_webdataset_loader
from iomm_scale.data.features import precompute_feature_shards
pattern, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
raw = WebDatasetConfig(paired_shards=[pattern], image_only_fraction=0.0, num_workers=workers, epochs=1, shuffle_buffer=1)
calls = []
def latents(px):
    calls.append(1)
    if len(calls) == 4:  # killed in the 4th batch: no cleanup, no exception handling
        os._exit(9)
    return F.pixel_unshuffle(px, 4)
vision = lambda px: F.pixel_unshuffle(px, 8).flatten(2).transpose(1, 2)
precompute_feature_shards(build_webdataset_loader(raw, 32, 4, 0, 1, 0), latents, vision, out + "/feat-%06d.tar", 32,
                          max_count=5, progress=out + "/progress.json")
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_a_precompute_pass_killed_midway_resumes_to_the_same_shards(tmp_path, workers):
    """tools/precompute_features.py is resumable: a pass killed in its 4th batch (shards of 5
    samples, batches of 4: shards 0-1 final, shard 2 half written) and started again goes on
    from shard 2 and ends with the same shards, byte for byte, and the same counts (a bad
    sample included) as an uninterrupted pass. Done again: nothing is redone; with other
    arguments or another data setup: refused, naming what differs."""
    import subprocess
    import sys

    pattern = _raw_shards_with_a_bad_sample(tmp_path)
    raw = WebDatasetConfig(paired_shards=[pattern], image_only_fraction=0.0, num_workers=workers, epochs=1,
                           shuffle_buffer=1)

    def latents(px):
        return F.pixel_unshuffle(px, 4)

    def vision(px):
        return F.pixel_unshuffle(px, 8).flatten(2).transpose(1, 2)

    def run(out, batch_size=4, **kw):
        args = dict(max_count=5, progress=str(out / "progress.json"))
        args.update(kw)
        return precompute_feature_shards(build_webdataset_loader(raw, R, batch_size, 0, 1, 0), latents, vision,
                                         str(out / "feat-%06d.tar"), R, **args)

    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    whole = run(tmp_path / "whole")
    assert whole["samples"] == 20 and whole["stats"]["bad"] == 1 and len(whole["shards"]) == 4
    assert whole["resumed"] is None

    script = tmp_path / "killed_pass.py"
    script.write_text(_KILLED_PASS)
    proc = subprocess.run([sys.executable, str(script), pattern, str(tmp_path / "killed"), str(workers)])
    assert proc.returncode == 9
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == [
        "feat-000000.tar", "feat-000001.tar", "feat-000002.tar.partial", "progress.json"]

    resumed = run(tmp_path / "killed")
    assert resumed["resumed"] == {"shard": 2, "samples": 10}
    assert {k: resumed[k] for k in ("samples", "bytes")} == {k: whole[k] for k in ("samples", "bytes")}
    assert [os.path.basename(p) for p in resumed["shards"]] == [os.path.basename(p) for p in whole["shards"]]
    assert resumed["stats"]["bad"] == 1 and resumed["stats"]["ok"] == whole["stats"]["ok"] == 20
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == names  # no .partial left
    for name in names:
        if name.endswith(".tar"):
            assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name

    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed").iterdir()}
    again = run(tmp_path / "killed")
    assert again["resumed"] == "complete" and again["samples"] == 20 and again["shards"] == resumed["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed").iterdir()} == mtimes

    with pytest.raises(ValueError, match=r"max_count: 5 -> 6"):
        run(tmp_path / "killed", max_count=6)
    (tmp_path / "killed" / "feat-000003.tar").unlink()
    with open(tmp_path / "killed" / "progress.json") as f:
        record = json.load(f)
    record.update(done=False, loader=state_after_three_batches(raw), skip=0, next_shard=3)  # as if stopped after shard 2
    with open(tmp_path / "killed" / "progress.json", "w") as f:
        json.dump(record, f)
    with pytest.raises(ValueError, match=r"batch_size: 4 -> 3"):
        run(tmp_path / "killed", batch_size=3)


def state_after_three_batches(raw) -> dict:
    """A loader's state after its first three batches (batches of 4)."""
    loader = build_webdataset_loader(raw, R, 4, 0, 1, 0)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    loader.close()
    return state
