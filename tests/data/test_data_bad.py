"""Bad data: skipped and counted per reason, exactly; the error budget stops with a clear message."""

import json
import logging
import tarfile
from collections import Counter

import pytest

from data_shardkit import (corrupt_png_header, good_jpeg, not_an_image, too_small_jpeg, truncate_tar_in_member,
                           truncated_jpeg, write_clean_shards, write_shard)
from iomm_scale.data import DataErrorBudgetExceeded, WebDatasetConfig, build_webdataset_loader
from iomm_scale.data.errors import check_budget, merge_stats

R = 32
# kind -> (expected reason, how many, sample factory)
PLANTED = {
    "truncated jpeg": ("truncated_image", 3, lambda i: {"jpg": truncated_jpeg(i), "txt": "ok"}),
    "zero bytes": ("empty_payload", 3, lambda i: {"jpg": b"", "txt": "ok"}),
    "html payload": ("not_an_image", 3, lambda i: {"jpg": not_an_image(i), "txt": "ok"}),
    "8 px image": ("too_small", 3, lambda i: {"jpg": too_small_jpeg(i), "txt": "ok"}),
    "no caption": ("missing_caption", 2, lambda i: {"jpg": good_jpeg(i)}),
    "blank caption": ("empty_caption", 2, lambda i: {"jpg": good_jpeg(i), "txt": "  \n"}),
    "png header crc": ("corrupt_header", 2, lambda i: {"png": corrupt_png_header(i), "txt": "ok"}),
    "caption only": ("missing_image", 1, lambda i: {"txt": "an image that never was"}),
}
SHARDS, PER_SHARD = 8, 25


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    """8 shards x 25 paired samples with 19 planted bad samples (~10%), one shard cut off
    inside a member, one file that is not a tar at all."""
    folder = tmp_path_factory.mktemp("corrupt")
    plan = [(kind, reason, make) for kind, (reason, n, make) in PLANTED.items() for _ in range(n)]
    bad_slots = {i * 10 + 3: p for i, p in enumerate(plan)}  # spread over the shards
    good = []
    for s in range(SHARDS):
        samples = []
        for j in range(PER_SHARD):
            i = s * PER_SHARD + j
            key = f"s{i:05d}"
            if i in bad_slots:
                samples.append({"__key__": key, **bad_slots[i][2](i)})
            else:
                samples.append({"__key__": key, "jpg": good_jpeg(i), "txt": f"caption {i}"})
                good.append(key)
        write_shard(str(folder / f"mix-{s:06d}.tar"), samples)
    # shard 8: cut in the middle of sample t00006's image -> t00000..t00005 survive
    write_shard(str(folder / f"mix-{SHARDS:06d}.tar"),
                [{"__key__": f"t{j:05d}", "jpg": good_jpeg(j), "txt": "fine"} for j in range(10)])
    survivors = truncate_tar_in_member(str(folder / f"mix-{SHARDS:06d}.tar"), member_index=12)
    assert survivors == 6
    good += [f"t{j:05d}" for j in range(survivors)]
    (folder / f"mix-{SHARDS + 1:06d}.tar").write_bytes(b"this is not a tar archive\n" * 40)
    expected = Counter(reason for _, reason, _ in plan)
    expected["shard_error"] = 2
    return str(folder / f"mix-{{000000..{SHARDS + 1:06d}}}.tar"), good, expected, folder


def read_all(cfg, world_size=2):
    keys, totals = [], Counter()
    for rank in range(world_size):
        loader = build_webdataset_loader(cfg, R, 4, rank, world_size, seed=0)
        for batch in loader:
            keys += batch["keys"]
            assert all(c for c in batch["captions"]) or not cfg.paired_shards
        stats = loader.stats()
        totals.update({k: v for k, v in stats["reasons"].items() if v})
        totals["__ok__"] += stats["ok"]
    return keys, totals


def test_counters_equal_the_planted_corruptions(corrupted):
    pattern, good, expected, _ = corrupted
    assert sum(expected.values()) - 2 == 19  # about 10% of 200 samples, 8 kinds, plus 2 bad shards
    cfg = WebDatasetConfig(paired_shards=[pattern], image_only_fraction=0.0, num_workers=2, epochs=1,
                           shuffle_buffer=7, error_budget=0.5)
    keys, totals = read_all(cfg)
    assert sorted(keys) == sorted(good)  # every good sample once, no bad one
    assert totals.pop("__ok__") == len(good)
    assert totals == expected


def test_bad_fraction_counts_bad_samples_and_shards_over_everything_read(corrupted):
    """The loader's stats: bad = planted samples, shard errors = the 2 broken shards, and the
    fraction the budget is judged on = (bad + bad shards) / (samples read + bad shards)."""
    pattern, good, expected, _ = corrupted
    cfg = WebDatasetConfig(paired_shards=[pattern], image_only_fraction=0.0, num_workers=2, epochs=1,
                           shuffle_buffer=7, error_budget=0.5)
    loader = build_webdataset_loader(cfg, R, 4, 0, 1, seed=0)
    for _ in loader:
        pass
    stats = loader.stats()
    assert (stats["ok"], stats["bad"], stats["shard_errors"]) == (len(good), 19, 2)
    assert stats["seen"] == len(good) + 19
    assert stats["bad_fraction"] == pytest.approx(21 / (len(good) + 19 + 2), rel=1e-12)


def test_error_budget_threshold_and_merge_of_worker_counts():
    a = {"ok": 90, "reasons": {"not_an_image": 4, "shard_error": 1}, "bad_by_shard": {"s1": 4, "s2": 1}}
    b = {"ok": 100, "reasons": {"truncated_image": 5}, "bad_by_shard": {"s3": 5}}
    stats = merge_stats([a, b])
    assert (stats["seen"], stats["ok"], stats["bad"], stats["shard_errors"]) == (199, 190, 9, 1)
    assert stats["bad_fraction"] == 10 / 200 and stats["worst_shards"] == [["s3", 5], ["s1", 4], ["s2", 1]]
    check_budget(stats, 0.05, 20, "here")  # exactly at the budget: allowed
    with pytest.raises(DataErrorBudgetExceeded, match=r"5.0% > error_budget 4.9%"):
        check_budget(stats, 0.049, 20, "here")
    check_budget(stats, 0.049, 201, "here")  # too few items yet to judge


def test_captions_do_not_matter_for_image_only_shards(corrupted):
    pattern, good, expected, _ = corrupted
    cfg = WebDatasetConfig(image_shards=[pattern], num_workers=2, epochs=1, shuffle_buffer=7, error_budget=0.5)
    keys, totals = read_all(cfg)
    caption_kinds = expected["missing_caption"] + expected["empty_caption"]
    assert totals.pop("__ok__") == len(keys) == len(good) + caption_kinds
    assert totals == {r: n for r, n in expected.items() if r not in ("missing_caption", "empty_caption")}


def test_counters_survive_a_resume_exactly_once(corrupted):
    pattern, _, _, _ = corrupted
    cfg = WebDatasetConfig(paired_shards=[pattern], image_only_fraction=0.0, num_workers=2, epochs=1,
                           shuffle_buffer=7, error_budget=0.5)
    full = build_webdataset_loader(cfg, R, 4, 0, 2, 0)
    full_keys = [b["keys"] for b in full]
    head = build_webdataset_loader(cfg, R, 4, 0, 2, 0)
    head_keys = [b["keys"] for _, b in zip(range(9), head)]
    state = json.loads(json.dumps(head.state_dict()))
    head.close()
    tail = build_webdataset_loader(cfg, R, 4, 0, 2, 0)
    tail.load_state_dict(state)
    assert head_keys + [b["keys"] for b in tail] == full_keys
    assert tail.stats()["reasons"] == full.stats()["reasons"] and tail.stats()["ok"] == full.stats()["ok"]


def test_error_budget_stops_with_a_message_naming_the_worst_shard(tmp_path):
    write_clean_shards(tmp_path, 4, 20, prefix="bad")
    write_shard(str(tmp_path / "bad-000002.tar"),
                [{"__key__": f"x{j:03d}", "jpg": not_an_image(j) if j < 15 else good_jpeg(j), "txt": "c"}
                 for j in range(20)])
    cfg = WebDatasetConfig(paired_shards=[str(tmp_path / "bad-{000000..000003}.tar")], image_only_fraction=0.0,
                           num_workers=2, shuffle_buffer=5, error_budget=0.05, min_samples_before_budget=20)
    loader = build_webdataset_loader(cfg, R, 4, 0, 1, 0)
    with pytest.raises(DataErrorBudgetExceeded) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert "error budget exceeded" in message and "error_budget 5.0%" in message
    assert "not_an_image" in message and f"{tmp_path}/bad-000002.tar" in message.split("Worst shards:")[1]


def test_bad_sample_warnings_are_rate_limited(tmp_path, caplog):
    write_shard(str(tmp_path / "w-000000.tar"),
                [{"__key__": f"w{j:03d}", "jpg": not_an_image(j)} for j in range(30)] +
                [{"__key__": "ok", "jpg": good_jpeg(0)}])
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / "w-000000.tar")], num_workers=0, epochs=1, shuffle_buffer=50,
                           error_budget=1.0, warn_first=2, warn_interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="iomm_scale.data"):
        batches = list(build_webdataset_loader(cfg, R, 4, 0, 1, 0))
    assert [b["keys"] for b in batches] == [["ok"]]
    lines = [r.getMessage() for r in caplog.records if "not_an_image" in r.getMessage()]
    assert len(lines) == 3  # the first two in full, then one summary for the next hour
    assert "1 more bad samples with reason not_an_image" in lines[2]


@pytest.mark.parametrize("cut_member", [5, 6, 9])  # in a caption, in an image, in the last sample
def test_a_cut_shard_reads_the_same_from_a_file_and_a_pipe(tmp_path, cut_member):
    """Random-access (file) and stream (pipe) reading agree on what survives a cut and
    both report it; the samples before the cut member's key survive."""
    from iomm_scale.data.shards import read_shard

    path = str(tmp_path / "cut.tar")
    write_shard(path, [{"__key__": f"k{j}", "jpg": good_jpeg(j), "txt": "c"} for j in range(5)])
    survivors = truncate_tar_in_member(path, member_index=cut_member)
    for url in (path, f"pipe:cat {path}"):
        keys = []
        with pytest.raises(Exception, match="unexpected end of data"):
            for sample in read_shard(url):
                keys.append(sample["__key__"])
        assert keys == [f"k{j}" for j in range(survivors)]


@pytest.mark.parametrize("where", ["gzip file cut", "tar cut, then gzipped"])
def test_a_cut_compressed_shard_is_an_error_not_a_short_shard(tmp_path, where):
    """A .tar.gz cut inside a member header read as a complete, shorter shard (the samples after
    the cut vanished uncounted): compressed shards must end with the decompressor's end mark and
    the archive's end marker, as plain ones must end with the marker."""
    import gzip

    from iomm_scale.data.shards import read_shard

    plain = tmp_path / "s.tar"
    write_shard(str(plain), [{"__key__": f"k{j}", "jpg": good_jpeg(j), "txt": "c"} for j in range(6)])
    raw = plain.read_bytes()
    with tarfile.open(plain) as t:
        cut = t.getmembers()[7].offset + 100  # inside k3.txt's header
    blob = gzip.compress(raw[:cut]) if where.startswith("tar") else gzip.compress(raw)[: len(gzip.compress(raw[:cut]))]
    (tmp_path / "s.tar.gz").write_bytes(blob)
    keys = []
    with pytest.raises(Exception, match="truncated|unexpected end"):
        for sample in read_shard(str(tmp_path / "s.tar.gz")):
            keys.append(sample["__key__"])
    assert keys == ["k0", "k1", "k2"]
    (tmp_path / "whole.tar.gz").write_bytes(gzip.compress(raw))  # and a whole one reads whole
    assert [x["__key__"] for x in read_shard(str(tmp_path / "whole.tar.gz"))] == [f"k{j}" for j in range(6)]


def test_a_stream_of_unreadable_shards_stops_instead_of_spinning(tmp_path):
    from iomm_scale.data import NoDataError

    for i in range(2):
        (tmp_path / f"junk-{i:06d}.tar").write_bytes(b"\x00garbage" * 100)
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / "junk-{000000..000001}.tar")], num_workers=0,
                           warn_first=0)
    loader = build_webdataset_loader(cfg, R, 4, 0, 1, 0)
    with pytest.raises(NoDataError, match="read no sample in 3 consecutive epochs of 2 shard"):
        next(loader)


def test_a_resume_does_not_recount_the_errors_of_the_chunk_it_rereads(tmp_path):
    write_clean_shards(tmp_path, 3, 4, prefix="c")
    truncate_tar_in_member(str(tmp_path / "c-000001.tar"), member_index=4)  # keeps 2 of 4 samples
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / "c-{000000..000002}.tar")], num_workers=0, epochs=1,
                           shuffle_buffer=50)  # one chunk holding all shards, the cut one included
    first = build_webdataset_loader(cfg, R, 2, 0, 1, 0)
    next(first)
    assert first.stats()["shard_errors"] == 1
    second = build_webdataset_loader(cfg, R, 2, 0, 1, 0)
    second.load_state_dict(first.state_dict())
    assert sum(len(b["keys"]) for b in second) == 10 - 2
    assert second.stats()["shard_errors"] == 1 and second.stats()["ok"] == 10


def test_a_bad_shard_counts_once_when_slots_outnumber_shards(tmp_path):
    """Split by sample (2 shards, 2 ranks x 2 workers) every slot reads every shard, and each
    counted the cut shard: 4 errors for 1 (the budget's bad fraction inflated alike)."""
    pattern, _ = write_clean_shards(tmp_path, n_shards=2, per_shard=10)
    truncate_tar_in_member(str(tmp_path / "img-000001.tar"), member_index=9)
    cfg = WebDatasetConfig(image_shards=[pattern], num_workers=2, epochs=1, shuffle_buffer=4)
    total = 0
    for rank in range(2):
        loader = build_webdataset_loader(cfg, 32, 2, rank, 2, 0)
        for _ in loader:
            pass
        total += loader.stats()["shard_errors"]
    assert total == 1


def test_a_slot_dealt_only_a_bad_shard_for_3_epochs_goes_on(tmp_path):
    """3 good shards and an empty one over 4 slots: the slot dealt the empty shard 3 epochs in a
    row used to stop the run (NoDataError) although the set is fine; it stops only once its
    empty streak has tried every shard (the all-bad test above)."""
    import numpy as np

    write_clean_shards(tmp_path, n_shards=3, per_shard=6)
    write_shard(str(tmp_path / "img-000003.tar"), [])
    seed = next(s for s in range(1000)  # a seed whose permutations deal shard 3 to one slot 3 times
                if len({[np.random.default_rng([s, 0, e]).permutation(4)[k::4].tolist() for k in range(4)].index([3])
                        for e in range(3)}) == 1)
    slot = [np.random.default_rng([seed, 0, 0]).permutation(4)[k::4].tolist() for k in range(4)].index([3])
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / "img-{000000..000003}.tar")], num_workers=0, shuffle_buffer=4)
    loader = build_webdataset_loader(cfg, 32, 4, slot, 4, seed)
    assert sum(1 for _, _ in zip(range(20), loader)) == 20
