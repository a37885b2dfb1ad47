"""The webdataset stream: rank x worker split, determinism, exact resume, the mixture."""

import json
import math
import os
from collections import Counter

import pytest
import torch

from data_shardkit import write_clean_shards
from iomm_scale.data import WebDatasetConfig, bucket_sizes, build_webdataset_loader

R = 32


def run(cfg, rank=0, world_size=1, seed=0, batch_size=5, limit=None, loader=None):
    """Batches as (keys, captions, pixel checksums) until the end or `limit` batches."""
    loader = loader or build_webdataset_loader(cfg, R, batch_size, rank, world_size, seed)
    out = []
    for batch in loader:
        assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape[1:] == (3, R, R)
        out.append((batch["keys"], batch["captions"], [round(float(p.double().sum()), 3) for p in batch["pixels"]]))
        if limit is not None and len(out) == limit:
            break
    return out, loader


def keys_of(batches):
    return [k for b in batches for k in b[0]]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    pattern, keys = write_clean_shards(folder, n_shards=9, per_shard=11)
    return folder, pattern, keys


def test_every_sample_exactly_once_per_epoch_over_2_ranks_x_2_workers(clean):
    _, pattern, keys = clean
    cfg = WebDatasetConfig(image_shards=[pattern], num_workers=2, epochs=2, shuffle_buffer=8)
    per_rank = [run(cfg, rank=r, world_size=2)[0] for r in range(2)]
    seen = Counter(k for batches in per_rank for k in keys_of(batches))
    assert seen == Counter({k: 2 for k in keys})  # 2 epochs: each sample twice, none lost
    # ranks own disjoint shards (the permutation changes per epoch, so compare within one epoch)
    one = WebDatasetConfig(image_shards=[pattern], num_workers=2, epochs=1, shuffle_buffer=8)
    r0, r1 = (set(keys_of(run(one, rank=r, world_size=2)[0])) for r in range(2))
    assert not r0 & r1 and r0 | r1 == set(keys)
    assert all(c is None for b in per_rank[0] for c in b[1])  # image-only shards: no captions


@pytest.mark.parametrize("world_size,workers", [(3, 2), (2, 3)])
def test_every_sample_exactly_once_when_ranks_and_workers_differ(clean, tmp_path, world_size, workers):
    """Slots are rank * workers + worker: with as many ranks as workers per rank (the test
    above) a slot formula mixing the two up still looks right."""
    _, pattern, keys = clean  # 9 shards for 6 slots: split by shard
    cfg = WebDatasetConfig(image_shards=[pattern], num_workers=workers, epochs=1, shuffle_buffer=8)
    seen = Counter(k for r in range(world_size) for k in keys_of(run(cfg, rank=r, world_size=world_size)[0]))
    assert seen == Counter(keys)
    few, few_keys = write_clean_shards(tmp_path, n_shards=2, per_shard=13)  # 2 shards for 6 slots: by sample
    cfg = WebDatasetConfig(image_shards=[few], num_workers=workers, epochs=1, shuffle_buffer=4)
    seen = Counter(k for r in range(world_size) for k in keys_of(run(cfg, rank=r, world_size=world_size, batch_size=3)[0]))
    assert seen == Counter(few_keys)


def test_fewer_shards_than_slots_splits_by_sample(tmp_path):
    pattern, keys = write_clean_shards(tmp_path, n_shards=2, per_shard=13)
    cfg = WebDatasetConfig(image_shards=[pattern], num_workers=2, epochs=1, shuffle_buffer=4)
    got = [k for r in range(2) for k in keys_of(run(cfg, rank=r, world_size=2, batch_size=3)[0])]
    assert sorted(got) == sorted(keys)


def test_same_seed_same_batches_other_seed_other_order(clean):
    _, pattern, _ = clean
    cfg = WebDatasetConfig(image_shards=[pattern], num_workers=2, epochs=1, shuffle_buffer=8)
    a, b = run(cfg, seed=3)[0], run(cfg, seed=3)[0]
    assert a == b
    c = run(cfg, seed=4)[0]
    assert keys_of(c) != keys_of(a) and sorted(keys_of(c)) == sorted(keys_of(a))


def _json_roundtrip(state):
    return json.loads(json.dumps(state))  # the state must survive any checkpoint format


@pytest.mark.parametrize("stop_after", [3, 14])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(clean, stop_after):
    """Two workers, two epochs (14 batches crosses the epoch boundary of some workers):
    interrupted + resumed in a new loader == uninterrupted, batch for batch, pixel for pixel."""
    _, pattern, _ = clean
    cfg = WebDatasetConfig(image_shards=[pattern], num_workers=2, epochs=2, shuffle_buffer=6)
    full, _ = run(cfg, rank=1, world_size=2)
    head, loader = run(cfg, rank=1, world_size=2, limit=stop_after)
    state = _json_roundtrip(loader.state_dict())
    loader.close()
    resumed = build_webdataset_loader(cfg, R, 5, 1, 2, 0)
    resumed.load_state_dict(state)
    tail, _ = run(cfg, loader=resumed)
    assert head + tail == full
    assert resumed.stats()["seen"] == len(keys_of(full))


def test_resume_with_mixture_and_aspect_buckets_is_exact(tmp_path):
    """Partially filled buckets at the save point are re-read and refilled on resume."""
    img, _ = write_clean_shards(tmp_path, 4, 10, prefix="img", captions=False, sizes=((48, 36), (36, 48), (40, 40)))
    par, _ = write_clean_shards(tmp_path, 4, 10, prefix="par", sizes=((40, 40), (48, 36)))
    cfg = WebDatasetConfig(image_shards=[img], paired_shards=[par], image_only_fraction=0.5, num_workers=2,
                           shuffle_buffer=5, buckets=["1:1", "4:3", "3:4"], bucket_multiple=8)

    def shapes_run(loader, limit):
        out = []
        for batch in loader:
            out.append((batch["keys"], batch["captions"], tuple(batch["pixels"].shape),
                        float(batch["pixels"].double().sum())))
            if len(out) == limit:
                break
        return out

    full = shapes_run(build_webdataset_loader(cfg, R, 3, 0, 1, 0), 24)
    first = build_webdataset_loader(cfg, R, 3, 0, 1, 0)
    head = shapes_run(first, 7)
    state = _json_roundtrip(first.state_dict())
    assert any(w["pending"] for w in state["workers"].values())  # the case under test
    first.close()
    second = build_webdataset_loader(cfg, R, 3, 0, 1, 0)
    second.load_state_dict(state)
    assert head + shapes_run(second, 17) == full
    assert {s[2][2:] for s in full} == {(h, w) for w, h in bucket_sizes(R, [1, 4 / 3, 3 / 4], 8)}
    for keys, captions, _, _ in full:  # captions exactly for the paired draws
        assert all((c is None) == k.startswith("img") for k, c in zip(keys, captions))


def test_mixture_fraction_within_binomial_bound(tmp_path):
    img, _ = write_clean_shards(tmp_path, 3, 10, prefix="img", captions=False, sizes=((32, 32),))
    par, _ = write_clean_shards(tmp_path, 3, 10, prefix="par", sizes=((32, 32),))
    lam, n = 0.3, 2000
    cfg = WebDatasetConfig(image_shards=[img], paired_shards=[par], image_only_fraction=lam, num_workers=2,
                           shuffle_buffer=10)
    batches, _ = run(cfg, batch_size=50, limit=n // 50)
    captions = [c for b in batches for c in b[1]]
    image_only = sum(c is None for c in captions)
    assert len(captions) == n
    assert abs(image_only - lam * n) <= 4 * math.sqrt(n * lam * (1 - lam)), image_only
    assert all((c is None) == k.startswith("img") for b in batches for k, c in zip(b[0], b[1]))
    assert all(c == f"photo number {int(k[3:])}" for b in batches for k, c in zip(b[0], b[1]) if c is not None)


@pytest.mark.parametrize("lam, expect", [(0.5, {"img", "par"}), (0.0, {"par"}), (1.0, {"img"})])
def test_finite_mixture_reads_each_drawn_stream_to_its_end(tmp_path, lam, expect):
    """epochs=1 with 10 image-only and 80 paired samples: the run used to stop when the shorter
    stream ended (72 paired samples never read, uncounted). Every stream the mixture draws from
    is read once (the other serves the draws once one is through); a stream it never draws
    (lambda 0: image-only, lambda 1: paired) is not read."""
    img, ik = write_clean_shards(tmp_path, 2, 5, prefix="img", captions=False, sizes=((32, 32),))
    par, pk = write_clean_shards(tmp_path, 2, 40, prefix="par", sizes=((32, 32),))
    cfg = WebDatasetConfig(image_shards=[img], paired_shards=[par], image_only_fraction=lam, num_workers=0,
                           epochs=1, shuffle_buffer=8)
    batches, loader = run(cfg)
    seen = Counter(keys_of(batches))
    assert seen == Counter({k: 1 for k in (ik if "img" in expect else []) + (pk if "par" in expect else [])})
    assert all((c is None) == k.startswith("img") or lam > 0 for b in batches for k, c in zip(b[0], b[1]))
    # read to the end: a relaxed resume (another worker count) of the finished stream yields nothing
    relaxed = build_webdataset_loader(WebDatasetConfig(**{**cfg.__dict__, "num_workers": 2}), R, 5, 0, 1, 0)
    relaxed.load_state_dict(loader.state_dict(), strict=False)
    assert keys_of(run(cfg, loader=relaxed)[0]) == []


def test_paired_only_withholds_captions_with_probability_lambda(tmp_path):
    par, _ = write_clean_shards(tmp_path, 2, 10, prefix="par")
    lam, n = 0.5, 600
    cfg = WebDatasetConfig(paired_shards=[par], image_only_fraction=lam, num_workers=0, shuffle_buffer=10)
    batches, _ = run(cfg, batch_size=50, limit=n // 50)
    withheld = sum(c is None for b in batches for c in b[1])
    assert abs(withheld - lam * n) <= 4 * math.sqrt(n * lam * (1 - lam))


def test_pipe_urls_read_like_local_paths(clean):
    folder, pattern, keys = clean
    local = WebDatasetConfig(image_shards=[pattern], num_workers=0, epochs=1, shuffle_buffer=8)
    piped = WebDatasetConfig(image_shards=[f"pipe:cat {folder}/img-{{000000..000008}}.tar"], num_workers=0,
                             epochs=1, shuffle_buffer=8)
    assert run(local)[0] == run(piped)[0]


def test_resample_is_deterministic_and_infinite(clean):
    _, pattern, keys = clean
    cfg = WebDatasetConfig(image_shards=[pattern], resample=True, num_workers=0, shuffle_buffer=8)
    a, _ = run(cfg, limit=30)
    assert a == run(cfg, limit=30)[0] and len(keys_of(a)) == 150 > len(keys)


def test_resume_refuses_a_changed_setup(clean):
    _, pattern, _ = clean
    cfg = WebDatasetConfig(image_shards=[pattern], num_workers=0, epochs=3, shuffle_buffer=8)
    _, loader = run(cfg, limit=25)  # 125 samples: inside epoch 1
    state = loader.state_dict()
    other = WebDatasetConfig(image_shards=[pattern], num_workers=2, epochs=3, shuffle_buffer=8)
    with pytest.raises(ValueError, match="num_workers: 0 -> 2"):
        build_webdataset_loader(other, R, 5, 0, 1, 0).load_state_dict(state)
    relaxed = build_webdataset_loader(other, R, 5, 0, 1, 0)
    relaxed.load_state_dict(state, strict=False)  # restarts at epoch 1: 2 more epochs
    assert len(keys_of(run(other, loader=relaxed)[0])) == 2 * 99


def test_bad_config_is_reported_before_work_starts(tmp_path):
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / "nope-{0..3}.tar")], image_only_fraction=1.5)
    with pytest.raises(ValueError, match="image_only_fraction: must be in"):
        build_webdataset_loader(cfg, R, 4, 0, 1, 0)
    cfg.image_only_fraction = 0.5
    with pytest.raises(ValueError, match=r"4 of 4 shards do not exist: .*nope-0\.tar"):
        build_webdataset_loader(cfg, R, 4, 0, 1, 0)
    assert os.path.exists(tmp_path)


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_at_every_batch_boundary(tmp_path, drop_last):
    """In-process (the worker logic is the same): a save after any batch, through chunk,
    bucket, epoch and end-of-stream boundaries, resumes to exactly the rest."""
    img, _ = write_clean_shards(tmp_path, 3, 5, prefix="img", captions=False, sizes=((48, 36), (40, 40)))
    par, _ = write_clean_shards(tmp_path, 2, 5, prefix="par", sizes=((36, 48), (40, 40)))
    cfg = WebDatasetConfig(image_shards=[img], paired_shards=[par], image_only_fraction=0.5, num_workers=0,
                           epochs=2, shuffle_buffer=4, buckets=["1:1", "4:3", "3:4"], bucket_multiple=8,
                           drop_last=drop_last)
    full = build_webdataset_loader(cfg, R, 3, 0, 1, 0)
    reference = [b["keys"] for b in full]
    assert len(reference) >= 8 and (min(map(len, reference)) == 3) == drop_last
    for k in range(1, len(reference)):
        first = build_webdataset_loader(cfg, R, 3, 0, 1, 0)
        head = [b["keys"] for _, b in zip(range(k), first)]
        second = build_webdataset_loader(cfg, R, 3, 0, 1, 0)
        second.load_state_dict(_json_roundtrip(first.state_dict()))
        assert head + [b["keys"] for b in second] == reference, k
        assert second.stats() == full.stats()


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_builtin_source_honours_the_mixture_fraction(lam):
    """The built-in demo set's captionless photos used to enter on top of lambda (0.36
    image-only at lambda 0); now lambda is the image-only fraction there too."""
    from iomm_scale.data.builtin import BuiltinLoader

    loader, n = BuiltinLoader(R, 8, lam, crops_per_photo=1), 0
    captions = [c for _ in range(150) for c in next(loader)["captions"]]
    n = len(captions)
    image_only = sum(c is None for c in captions)
    assert abs(image_only - lam * n) <= 4 * math.sqrt(n * max(lam * (1 - lam), 1e-9)) + (0 if lam == 0 else 1)


@pytest.mark.parametrize("resize_filter,workers", [("bicubic", 0), ("bilinear", 0), ("bicubic", 2)])
def test_batches_hold_exactly_the_per_sample_decode(tmp_path, resize_filter, workers):
    """Images are resampled straight into their batch slot: every batch must equal
    decode_image_chw of its samples, one by one, bit for bit. Sizes cover both crop
    directions, no resize, a DCT-scaled decode, EXIF quarter turns (turned into the slot),
    two aspect buckets, a bad sample in the middle (its slot is reused) and partial last
    batches."""
    from PIL import Image

    from data_shardkit import PHOTOS, encode, photo, write_shard
    from iomm_scale.data.preprocess import decode_image_chw

    samples, payloads = [], {}
    sizes = [(48, 40), (40, 56), (96, 80), (32, 32), (200, 120), (64, 48), (40, 64)]
    for i in range(23):
        w, h = sizes[i % len(sizes)]
        im = photo(PHOTOS[i % len(PHOTOS)], w, h)
        kw = {}
        if i % 5 == 3:
            exif = Image.Exif()
            exif[0x0112] = 6 if i % 2 else 3
            kw["exif"] = exif.tobytes()
        data = encode(im, "JPEG" if i % 4 else "PNG", **({"quality": 90, **kw} if i % 4 else {}))
        key = f"s{i:03d}"
        samples.append({"__key__": key, "jpg" if i % 4 else "png": data})
        payloads[key] = data
        if i == 11:
            samples.append({"__key__": "broken", "jpg": data[: len(data) // 3]})
    write_shard(str(tmp_path / "mixed-000000.tar"), samples)
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / "mixed-000000.tar")], num_workers=workers, epochs=1,
                           shuffle_buffer=8, buckets=["1:1", "4:3"], bucket_multiple=8, resize_filter=resize_filter)
    loader = build_webdataset_loader(cfg, R, 4, 0, 1, seed=3)
    buckets = bucket_sizes(R, [1.0, 4 / 3], 8)
    seen, shapes, partial = [], set(), 0
    for batch in loader:
        pixels = batch["pixels"]
        assert pixels.is_contiguous(memory_format=torch.channels_last)
        partial += len(batch["keys"]) < 4
        for key, got in zip(batch["keys"], pixels):
            want = decode_image_chw(payloads[key], R, buckets=buckets, resize_filter=resize_filter)
            assert torch.equal(got, want), key
            shapes.add(tuple(got.shape))
            seen.append(key)
    assert sorted(seen) == sorted(payloads) and loader.stats()["reasons"]["truncated_image"] == 1
    assert len(shapes) == 2 and partial >= 1


def test_shared_batch_pool_never_hands_out_a_buffer_still_out():
    """SharedBatchPool (a DataLoader worker's side): a buffer is filled again only once the
    main process cleared its flag and it is not being filled; a full pool replaces a free
    buffer of another shape (a new generation of that slot: sent as a tensor again, not by
    layout); with every buffer out it allocates outside the pool."""
    from iomm_scale.data.stream import SharedBatchPool

    flags = torch.zeros(3, dtype=torch.uint8)
    pool = SharedBatchPool(flags)
    a = pool.take((2, 3))
    b = pool.take((2, 3))
    assert a.data_ptr() != b.data_ptr()  # a is being filled: not handed out twice
    assert pool.sent(a) == (0, 0, False) and flags.tolist() == [1, 0, 0]
    pool.give_back(b)  # b was not sent: free at once
    assert pool.take((2, 3)).data_ptr() == b.data_ptr() and pool.sent(b) == (1, 0, False)
    c = pool.take((4,), torch.uint8)  # another shape: the third slot
    assert pool.sent(c) == (2, 0, False) and flags.tolist() == [1, 1, 1]
    d = pool.take((2, 3))  # every buffer out: outside the pool, not sent as a slot
    assert d.data_ptr() not in {a.data_ptr(), b.data_ptr(), c.data_ptr()} and pool.sent(d) is None
    flags[0] = 0  # the main process released a: filled again, and sent by layout (it has it)
    assert pool.take((2, 3)).data_ptr() == a.data_ptr() and pool.sent(a) == (0, 0, True)
    flags[0] = flags[2] = 0  # a and c released; the pool is full: a third shape replaces a free buffer
    e = pool.take((5,), torch.float16)
    assert e.shape == (5,) and e.dtype == torch.float16
    slot, generation, known = pool.sent(e)
    assert slot in (0, 2) and generation == 1 and not known
    assert flags.sum() == 2  # b and e out
