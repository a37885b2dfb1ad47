"""read_shard's header fast path (tar headers parsed from pread windows of the shard, by the
C helper or its Python fallback) gives exactly what tarfile gives: same samples, same bytes,
same error after the same samples, for every tar format Python writes, long names, links, odd
sizes, members larger than a window, and cut or corrupt shards. The reference is the
streaming path (`pipe:cat`), which only ever uses tarfile."""

import io
import tarfile

import pytest

from iomm_scale.data import shards
from iomm_scale.data.shards import FileSpan, _Member, _open_tar, read_shard


def _tar(path, fmt, extra=()):
    with tarfile.open(path, "w", format=fmt) as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE, target=""):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname, info.mtime = kind, len(data), target, 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for i, size in enumerate((0, 1, 511, 512, 513, 3000)):
            add(f"s{i:03d}.bin", bytes(range(256)) * (size // 256) + bytes(size % 256))
            add(f"s{i:03d}.txt", f"caption {i}".encode())
        add("d" * 60 + "/" + "e" * 70 + ".bin", b"long name, split into the ustar prefix")  # > 100 chars
        add("long" + "x" * 120 + ".bin", b"a name no ustar field holds")  # PAX / GNU headers; USTAR refuses it
        add("dir/", kind=tarfile.DIRTYPE)
        add("link.bin", kind=tarfile.SYMTYPE, target="s000.bin")
        for name, data in extra:
            add(name, data)
        add("last.bin", b"last")
    return path


def _read(url):
    samples, error = [], None
    try:
        for s in read_shard(url, views=("bin",)):
            samples.append({k: bytes(v) if isinstance(v, FileSpan) else v
                            for k, v in s.items() if k != "__url__"})
    except Exception as e:  # noqa: BLE001 - compared between the two paths
        error = type(e).__name__
    return samples, error


# members around and beyond a 4 kB window (read on their own, or straddling a window's end)
_LARGE = tuple((f"w{size}.bin", bytes(range(251)) * (size // 251) + bytes(size % 251)) for size in (4095, 4096, 4097, 9000))


def _variants(tmp_path):
    out = {}
    for fmt, tag in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")):
        out[tag] = _tar(tmp_path / f"{tag}.tar", fmt, extra=_LARGE)
    with pytest.raises(ValueError):  # USTAR cannot hold the 128-char name: leave it out there
        _tar(tmp_path / "bad.tar", tarfile.USTAR_FORMAT)
    ustar = tmp_path / "ustar.tar"
    with tarfile.open(ustar, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(5):
            info = tarfile.TarInfo(("p" * 80 + "/" if i == 2 else "") + f"k{i}.bin")
            info.size = 700
            tar.addfile(info, io.BytesIO(bytes([i]) * 700))
    out["ustar"] = str(ustar)
    raw = (tmp_path / "pax.tar").read_bytes()
    with tarfile.open(tmp_path / "pax.tar") as tar:
        members = tar.getmembers()
    last, big = members[-1], members[10]  # s005.bin, 3000 bytes
    end_of_data = last.offset_data + -(-last.size // 512) * 512
    cuts = {"cut_in_header": big.offset + 100, "cut_in_data": big.offset_data + 600, "cut_before_marker": end_of_data}
    for tag, n in cuts.items():
        (tmp_path / f"{tag}.tar").write_bytes(raw[:n])
        out[tag] = str(tmp_path / f"{tag}.tar")
    bad = bytearray(raw)
    bad[members[3].offset + 10] ^= 0xFF  # a name byte of the 4th header: its checksum no longer matches
    (tmp_path / "bad_checksum.tar").write_bytes(bytes(bad))
    out["bad_checksum"] = str(tmp_path / "bad_checksum.tar")
    bad = bytearray(raw)
    bad[members[2].offset + 124:members[2].offset + 136] = b"zzzzzzzzzzz\x00"  # 3rd header: a size that is not octal
    (tmp_path / "bad_size.tar").write_bytes(bytes(bad))
    out["bad_size"] = str(tmp_path / "bad_size.tar")
    return {k: str(v) for k, v in out.items()}


@pytest.mark.parametrize("parser, block", [("native", 4096), ("python", 4096), ("native", 512), ("python", 1024)])
def test_fast_headers_equal_tarfile(tmp_path, monkeypatch, parser, block):
    monkeypatch.setattr(shards, "_WINDOW_BLOCK", block)
    if parser == "python":
        monkeypatch.setattr(shards, "_ustar_header", shards._ustar_fields)
    for tag, path in _variants(tmp_path).items():
        fast, reference = _read(path), _read(f"pipe:cat {path}")
        assert fast == reference, tag
        if tag in ("pax", "gnu", "ustar"):
            assert reference[1] is None and len(reference[0]) >= 5, tag
        else:
            assert reference[1] is not None, tag  # every damaged variant is noticed


def test_fast_path_is_taken(tmp_path):
    path = _variants(tmp_path)["pax"]
    with open(path, "rb") as f:
        members, _, _ = _open_tar(f, ("bin",))
        kinds = [type(m) for m in members]
    # tarfile reads the first header to open the file; the plain ones after it are parsed from
    # the mapping; the two PAX long names, the directory and the link go through tarfile
    assert kinds[0] is tarfile.TarInfo and kinds[1:12] == [_Member] * 11
    assert kinds.count(tarfile.TarInfo) == 5, kinds
    with open(_variants(tmp_path)["ustar"], "rb") as f:  # the ustar prefix field (a 84-char name) included
        members, _, _ = _open_tar(f, ("bin",))
        names = [(type(m), m.name) for m in members]
    assert names[1:] == [(_Member, ("p" * 80 + "/" if i == 2 else "") + f"k{i}.bin") for i in range(1, 5)]
