"""tools/make_shards.py: folders and manifests -> shards, bad files rejected per reason."""

import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_shardkit import encode, good_jpeg, not_an_image, photo, truncated_jpeg
from iomm_scale.data import WebDatasetConfig, build_webdataset_loader, make_shards, scan_folder, scan_manifest

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(7):  # good, captioned by .txt
        (src / f"good{i}.jpg").write_bytes(good_jpeg(i))
        (src / f"good{i}.txt").write_text(f"a photo, number {i}")
    (src / "sub" / "p.png").write_bytes(encode(photo("rocket", 40, 48), "PNG"))  # caption from .json
    (src / "sub" / "p.json").write_text(json.dumps({"caption": "a rocket", "source": "skimage"}))
    (src / "nocap.jpg").write_bytes(good_jpeg(9))
    for name, data in {"empty.jpg": b"", "html.jpg": not_an_image(0), "cut.jpg": truncated_jpeg(1),
                       "tiny.png": encode(photo("coffee", 12, 10), "PNG")}.items():
        (src / name).write_bytes(data)
        (src / name).with_suffix(".txt").write_text("captioned, but the image is bad")
    (src / "blank.jpg").write_bytes(good_jpeg(3))
    (src / "blank.txt").write_text("   ")
    return src


def test_folder_to_shards_with_rejections(folder, tmp_path):
    summary = make_shards(scan_folder(str(folder)), str(tmp_path / "out" / "img-%06d.tar"), max_count=3,
                          min_size=16, require_caption=True)
    assert summary.written == 8 and len(summary.shards) == 3
    assert summary.rejected == {"missing_caption": 1, "empty_payload": 1, "not_an_image": 1, "truncated_image": 1,
                                "too_small": 1, "empty_caption": 1}
    assert "img-{000000..000002}.tar" in summary.format()
    cfg = WebDatasetConfig(paired_shards=[str(tmp_path / "out" / "img-{000000..000002}.tar")],
                           image_only_fraction=0.0, num_workers=0, epochs=1)
    loader = build_webdataset_loader(cfg, 32, 4, 0, 1, 0)
    got = {k: c for b in loader for k, c in zip(b["keys"], b["captions"])}
    assert got == {**{f"good{i}": f"a photo, number {i}" for i in range(7)}, "sub/p": "a rocket"}
    assert loader.stats()["bad"] == 0  # everything bad was stopped at the door


def test_size_limit_and_reencoding(folder, tmp_path):
    summary = make_shards(scan_folder(str(folder)), str(tmp_path / "img-%06d.tar"), max_size_mb=0.004,
                          max_side=24, shuffle=False)
    assert summary.written == 11 and len(summary.shards) >= 2  # ~1 kB per re-encoded sample, 4 kB shards
    names = []
    for shard in summary.shards:
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                names.append(m.name)
                if m.name.endswith(".jpg"):
                    assert max(Image.open(io.BytesIO(t.extractfile(m).read())).size) <= 24
    assert "sub/p.jpg" in names and "tiny.png" in names  # the 40x48 PNG re-encoded, the 12x10 one kept


def test_manifest_and_cli(folder, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    rows = [{"image": f"src/good{i}.jpg", "caption": f"cap {i}", "key": f"m/{i}", "license": "cc0"} for i in range(4)]
    rows.append({"image": str(folder / "html.jpg"), "caption": "not really"})
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    entries = list(scan_manifest(str(manifest)))
    assert [e["key"] for e in entries[:4]] == [f"m/{i}" for i in range(4)] and entries[0]["meta"] == {"license": "cc0"}
    tool = load_tool("make_shards")
    assert tool.main(["--manifest", str(manifest), "--out", str(tmp_path / "cli" / "pairs"), "--max-count", "2",
                      "--require-caption", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "written: 4 samples in 2 shards" in out and "not_an_image: 1" in out
    assert "pairs-000000.tar done: 2 samples so far" in out and "pairs-000001.tar done: 4 samples so far" in out
    assert os.path.exists(tmp_path / "cli" / "pairs-000001.tar")
    assert "pairs-{000000..000001}.tar" in out
    # a missing source is named at once; an empty folder says why nothing was written
    assert tool.main(["--folder", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert f"--folder {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err
    assert tool.main(["--manifest", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2
    # a malformed manifest line is named (file:line) before any shard is written
    for bad, words in (('{"caption": "no image"}', "a line must be an object with an 'image' field"),
                       ("not json", "not JSON")):
        broken = tmp_path / "broken.jsonl"
        broken.write_text(manifest.read_text().splitlines()[0] + "\n" + bad + "\n")
        capsys.readouterr()
        assert tool.main(["--manifest", str(broken), "--out", str(tmp_path / "b" / "x")]) == 2
        assert f"broken.jsonl:2: {words}" in capsys.readouterr().err
        assert not (tmp_path / "b").exists()
    (tmp_path / "empty").mkdir()
    assert tool.main(["--folder", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 1
    assert "nothing written" in capsys.readouterr().err and not os.path.exists(tmp_path / "x-000000.tar")


def test_shards_appear_only_when_complete(tmp_path):
    """A writer killed mid-shard leaves the finished shards under their names and the one in
    progress as `.partial` only: a reader's brace pattern never matches a half-written tar."""
    import subprocess
    import sys

    script = f"""
import os, torch
from iomm_scale.data import write_feature_shards
def samples():
    for i in range(5):
        if i == 3:
            os._exit(9)  # killed: no cleanup runs
        yield {{"key": f"k{{i}}", "latents": torch.zeros(2, 2, 2), "vision_features": torch.zeros(3, 4), "resolution": 16}}
write_feature_shards(samples(), {str(tmp_path / "feat-%06d.tar")!r}, max_count=2)
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert sorted(os.listdir(tmp_path)) == ["feat-000000.tar", "feat-000001.tar.partial"]
    with tarfile.open(tmp_path / "feat-000000.tar") as tar:
        assert len(tar.getnames()) == 2 * 3  # two complete samples (latents, vision, json)


def test_reencoding_without_verify_rejects_a_damaged_image(folder, tmp_path):
    """--no-verify --max-side: the shrink is the first full decode, and a truncated JPEG failed
    there with an OSError that stopped the whole run; it is a counted rejection like with verify."""
    summary = make_shards(scan_folder(str(folder)), str(tmp_path / "o-%06d.tar"), verify=False, max_side=16,
                          shuffle=False)
    assert summary.rejected.get("truncated_image") == 1 and summary.written > 0


def test_a_crash_while_writing_leaves_the_open_shard_partial(tmp_path):
    """A failure mid-shard (here the feature encoder) must not give the half-filled shard its
    final name: readers and patterns only ever see complete shards."""
    import torch

    from iomm_scale.data import write_feature_shards

    def samples():
        for i in range(7):
            yield {"key": f"k{i}", "latents": torch.zeros(4, 4, 4), "vision_features": torch.zeros(6, 8),
                   "resolution": 32}
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_feature_shards(samples(), str(tmp_path / "feat-%06d.tar"), max_count=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feat-000000.tar", "feat-000001.tar.partial"]


def _write_syscalls() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("syscw:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts write calls through Linux's /proc/self/io")
def test_shards_are_written_in_large_pieces_and_synced_before_their_rename(tmp_path, monkeypatch):
    """Shards reach the kernel in 1 MB writes (the page cache then keeps them in large folios,
    which a loader copies out faster than the 4 kB pages tarfile's 10 kB writes leave), their bytes
    are exactly webdataset's TarWriter's, and a shard is flushed, synced and closed before the
    rename gives it its final name."""
    import torch
    import webdataset as wds

    from iomm_scale.data import features, write_feature_shards

    samples = [{"key": f"k{i}", "latents": torch.randn(4, 32, 32), "vision_features": torch.randn(64, 256),
                "resolution": 256} for i in range(40)]  # ~2.9 MB of float32
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))

    def replace(src, dst):
        renamed.append((src, os.path.getsize(src)))  # already complete on disk: synced, closed
        assert synced and synced[-1] == src
        with tarfile.open(src) as tar:
            assert len(tar.getnames()) == 3 * 20
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    before = _write_syscalls()
    write_feature_shards(samples, str(tmp_path / "feat-%06d.tar"), max_count=20)
    writes = _write_syscalls() - before
    sizes = [os.path.getsize(tmp_path / f"feat-{i:06d}.tar") for i in range(2)]
    assert [s for _, s in renamed] == sizes and len(synced) == 2
    assert writes <= sum(-(-s // (1 << 20)) for s in sizes) + 2, writes  # ~300 with tarfile's own 10 kB writes

    # the bytes are webdataset's: same records through its plain TarWriter
    with wds.TarWriter(str(tmp_path / "ref.tar"), encoder=False, mtime=0) as w:
        for s in samples[:20]:
            w.write({"__key__": s["key"], features.LATENTS: features._npy(s["latents"].numpy(), "float32"),
                     features.VISION: features._npy(s["vision_features"].numpy(), "float32"),
                     "json": json.dumps({"resolution": 256}).encode()})
    assert (tmp_path / "ref.tar").read_bytes() == (tmp_path / "feat-000000.tar").read_bytes()


_KILLED_MAKE_SHARDS = """
import os, sys
from iomm_scale.data import writer
src, out = sys.argv[1], sys.argv[2]
prepare, seen = writer._prepare, []
def dying(job):
    seen.append(job)
    if len(seen) == 10:  # killed while checking the 10th entry: no cleanup runs
        os._exit(9)
    return prepare(job)
writer._prepare = dying
writer.make_shards(writer.scan_folder(src), out + "/img-%06d.tar", max_count=2, min_size=16, require_caption=True,
                   progress=out + "/img.progress.json")
"""


def test_a_make_shards_pass_killed_midway_resumes_to_the_same_shards(folder, tmp_path, capsys):
    """make_shards with a progress file (what tools/make_shards.py passes): killed while checking
    its 10th image, then run again (with 2 worker processes: not part of the job), it goes on from
    the shard it was writing and ends with the uninterrupted pass's shards, byte for byte, and its
    counts, rejections included. Run once more, nothing is redone; other options are refused,
    and the tool says so (exit 2)."""
    import subprocess
    import sys

    def run(out, **kw):
        args = dict(max_count=2, min_size=16, require_caption=True, progress=str(out / "img.progress.json"))
        args.update(kw)
        return make_shards(scan_folder(str(folder)), str(out / "img-%06d.tar"), **args)

    whole = run(tmp_path / "whole")
    assert whole.written == 8 and len(whole.shards) == 4 and sum(whole.rejected.values()) == 6
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_MAKE_SHARDS)
    (tmp_path / "killed").mkdir()
    assert subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "killed")]).returncode == 9
    left = sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert "img.progress.json" in left and sum(n.endswith(".partial") for n in left) == 1, left
    assert 1 <= sum(n.endswith(".tar") for n in left) < 4, left  # some shards final, not all

    resumed = run(tmp_path / "killed", workers=2)
    assert resumed.resumed["shard"] == sum(n.endswith(".tar") for n in left)
    assert (resumed.written, resumed.bytes, resumed.rejected) == (whole.written, whole.bytes, whole.rejected)
    assert [os.path.basename(s) for s in resumed.shards] == [os.path.basename(s) for s in whole.shards]
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == names
    for name in names:
        if name.endswith(".tar"):
            assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name

    again = run(tmp_path / "killed")
    assert again.resumed == "complete" and again.written == 8 and "already complete" in again.format()
    with pytest.raises(ValueError, match=r"max_count: 2 -> 3"):
        run(tmp_path / "killed", max_count=3)
    tool = load_tool("make_shards")
    capsys.readouterr()
    assert tool.main(["--folder", str(folder), "--out", str(tmp_path / "killed" / "img"), "--max-count", "2",
                      "--min-size", "16", "--require-caption"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert tool.main(["--folder", str(folder), "--out", str(tmp_path / "killed" / "img"), "--max-count", "2",
                      "--min-size", "16"]) == 2
    assert "require_caption: True -> False" in capsys.readouterr().err
