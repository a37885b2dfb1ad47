"""The data loader's C helper (iomm_scale/data/_native.c) against its Python fallbacks: the
one-pass finite check, the read-and-check of a feature array, and the tar header parser give
the same answers, bit pattern by bit pattern, piece boundary by piece boundary, header by
header; and a loader gives the same batches and counts with and without it."""

import io
import os
import random
import shutil
import sys
import tarfile

import numpy as np
import pytest
import torch

from iomm_scale.data import WebDatasetConfig, build_webdataset_loader, features, shards, write_feature_shards
from iomm_scale.data.features import all_finite

native = features._native
PIECE = 256 * 1024  # pread_finite's piece (_native.c)


def test_native_helper_is_built():
    """`pip install` builds it wherever a C compiler is (optional=True would otherwise let a
    broken build pass unnoticed, and every test below would compare the fallback with itself)."""
    if not sys.platform.startswith("linux") or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the Python fallbacks run (and are what the other tests check)")
    assert native is not None and shards._ustar_header is native.ustar_header


needs_native = pytest.mark.skipif(native is None, reason="C helper not built (no compiler at install)")


def test_all_finite_on_every_pattern():
    """Every float16 and bfloat16 bit pattern, and float32 patterns around every exponent and
    sign, alone among finite values at a position that moves through the vector loop and its
    tail: the C pass (when built) and the NumPy passes say what torch.isfinite says."""
    halves = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    edges32 = torch.tensor([s | (e << 23) | m for s in (0, 1 << 31) for e in range(256)
                            for m in (0, 1, 0x400000, 0x7FFFFF)], dtype=torch.int64)
    edges32 = torch.where(edges32 >= 2 ** 31, edges32 - 2 ** 32, edges32).to(torch.int32)
    paths = (False, True) if native is not None else (False,)
    checked = 0
    for bits, dtypes in ((halves, (torch.float16, torch.bfloat16)), (edges32, (torch.float32,))):
        for dtype in dtypes:
            values = bits.view(dtype)
            expect = torch.isfinite(values)
            base = torch.linspace(-3, 3, 37).to(dtype)  # 37: a vector body plus a scalar tail
            for i, (v, ok) in enumerate(zip(values, expect.tolist())):
                one = base.clone()
                one[i % 37] = v
                assert [all_finite(one, native=p) for p in paths] == [ok] * len(paths), (dtype, v, i % 37)
                checked += 1
            for p in paths:
                assert all_finite(values[expect], native=p) and not all_finite(values, native=p)
    assert checked == 2 * 2 ** 16 + 2 * 256 * 4


@needs_native
def test_pread_finite_reads_like_pread_and_checks_every_piece(tmp_path):
    """The file's bytes land in the buffer exactly as os.pread returns them, and a non-finite
    value is found wherever it sits: first, last, either side of a piece boundary; the
    buffer may be unaligned; a read past the end returns the short count and checks only
    whole values; float32 by its own width and mask."""
    rng = np.random.default_rng(0)
    n = 3 * PIECE // 2 + 5  # float16 values: three pieces and a bit
    data = rng.standard_normal(n).astype(np.float16)
    positions = [0, PIECE // 2 - 1, PIECE // 2, PIECE - 1, n - 1]  # value index (2 bytes each)
    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        for bad in [None] + positions:
            arr = data.copy()
            if bad is not None:
                arr[bad] = np.float16(np.inf) if bad % 2 else np.float16(np.nan)
            os.pwrite(fd, b"xyz" + arr.tobytes(), 0)  # the array at an odd file offset
            raw = np.empty(arr.nbytes + 1, np.uint8)[1:]  # an unaligned destination
            got, finite = native.pread_finite(fd, 3, raw, 2, 0x7C00)
            assert got == arr.nbytes and raw.tobytes() == os.pread(fd, arr.nbytes, 3)
            assert finite == (bad is None) == all_finite(torch.from_numpy(raw.view(np.float16).copy()), native=False)
        # past the end: 5 bytes there, two values and half a third (0xff: not checked)
        os.ftruncate(fd, 3 + 5)
        buf = np.zeros(8, np.uint8)
        os.pwrite(fd, np.array([1.0, 2.0], np.float16).tobytes() + b"\xff", 3)
        assert native.pread_finite(fd, 3, buf, 2, 0x7C00) == (5, True)
        os.pwrite(fd, np.array([1.0, np.inf], np.float16).tobytes() + b"\xff", 3)
        assert native.pread_finite(fd, 3, buf, 2, 0x7C00) == (5, False)
        f32 = np.array([1.0, -2.0, np.nan], np.float32)
        os.pwrite(fd, f32.tobytes(), 0)
        assert native.pread_finite(fd, 0, np.zeros(8, np.uint8), 4, 0x7F800000) == (8, True)
        assert native.pread_finite(fd, 0, np.zeros(12, np.uint8), 4, 0x7F800000) == (12, False)
        with pytest.raises(ValueError, match="whole 4-byte"):
            native.pread_finite(fd, 0, np.zeros(6, np.uint8), 4, 0x7F800000)
        with pytest.raises(TypeError):  # read-only destination
            native.pread_finite(fd, 0, bytes(8), 2, 0x7C00)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        native.pread_finite(fd, 0, np.zeros(8, np.uint8), 2, 0x7C00)  # closed descriptor


def _headers(tmp_path):
    """Every header block of tars Python writes (ustar, GNU, PAX; prefix-split long names)."""
    out = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for i, name in enumerate(["a.bin", "k/" + "p" * 90 + "/b.txt", "c" * 99, "dir/"]):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = (0 if name.endswith("/") else 700 * i), 1_700_000_000 + i, 0o644
                info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
                tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
        raw = path.read_bytes()
        with tarfile.open(path) as tar:
            out += [raw[m.offset:m.offset + 512] for m in tar.getmembers()]
    return out


def _with_checksum(hdr: bytearray) -> bytes:
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\x00 " % sum(hdr)
    return bytes(hdr)


@needs_native
def test_ustar_header_native_equals_python(tmp_path):
    """On every real header the C parser answers as the Python one; on unusual forms it may
    only decline (None: tarfile parses that header then, so the result is tarfile's either
    way), never answer differently; and both decline the same broken headers. 20,000 random
    byte changes (checksum recomputed, so the parse goes past it) hold to the same rule."""
    headers = _headers(tmp_path)
    regular = [h for h in headers if native.ustar_header(h) is not None]
    assert len(regular) >= 6  # ustar and GNU regular files; PAX headers of long names decline
    for h in headers:
        assert native.ustar_header(h) == shards._ustar_fields(h)
    a = bytearray(regular[0])

    def variant(field, value):
        h = bytearray(a)
        h[field[0]:field[1]] = value.ljust(field[1] - field[0], b"\x00")
        return _with_checksum(h)

    size = (124, 136)
    same = {"spaces": variant(size, b"  0001274 "), "empty": variant(size, b""),
            "nul_padded": variant(size, b"1274\x00"), "base256": variant(size, b"\x80" + b"\x00" * 11),
            "bad_checksum": bytes(a[:10]) + bytes([a[10] ^ 1]) + bytes(a[11:]),
            "dir": _with_checksum(bytearray(a[:156]) + b"5" + a[157:]),
            "not_ustar": _with_checksum(bytearray(a[:257]) + b"x" * 8 + a[265:]),
            "slash": variant((0, 100), b"dir/"), "no_name": variant((0, 100), b""), "short": bytes(a[:300])}
    for tag, h in same.items():
        assert native.ustar_header(h) == shards._ustar_fields(h), tag
    assert native.ustar_header(same["spaces"]) == (a[:100].split(b"\x00")[0], 0o1274)
    # forms Python's int() takes and the C parser leaves to tarfile
    for value in (b"0o1274", b"1_274", b"1274\x00zz", b"\t1274"):
        h = variant(size, value)
        assert shards._ustar_fields(h) is not None and native.ustar_header(h) is None, value
    rnd = random.Random(0)
    answered = 0
    for _ in range(20000):
        h = bytearray(rnd.choice(regular))
        for _ in range(rnd.randint(1, 3)):
            h[rnd.randrange(512)] = rnd.choice([0, 32, 47, 48, 55, 56, rnd.randrange(256)])
        h = _with_checksum(h) if rnd.random() < 0.9 else bytes(h)
        got = native.ustar_header(h)
        assert got is None or got == shards._ustar_fields(h), h
        answered += got is not None
    assert answered > 5000  # most changes leave a valid header: both parse it


@needs_native
def test_loader_with_and_without_the_helper(tmp_path, monkeypatch):
    """Feature shards (float16 and float32) with non-finite values planted first, last and at
    piece boundaries of some samples: the loader gives the same batches and the same counts
    with the C helper and with the Python fallbacks (finite check and header parser)."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(24):
        lat, vis = torch.randn(4, 8, 8, generator=g), torch.randn(PIECE // 512 + 3, 512, generator=g)
        where = i % 6  # 0-1: clean; 2: first latent; 3: last vision value; 4, 5: either side of a piece end
        if where == 2:
            lat.view(-1)[0] = float("nan")
        elif where == 3:
            vis.view(-1)[-1] = float("-inf")
        elif where >= 4:  # float16: 2 bytes a value; float32: 4
            vis.view(-1)[PIECE // (2 if i < 12 else 4) - (where == 4)] = float("inf")
        samples.append({"key": f"s{i:03d}", "latents": lat, "vision_features": vis, "resolution": 32})
    for dtype, part in (("float16", samples[:12]), ("float32", samples[12:])):
        write_feature_shards(part, str(tmp_path / f"{dtype}-%06d.tar"), dtype=dtype)
    cfg = WebDatasetConfig(image_shards=[str(tmp_path / f"{d}-000000.tar") for d in ("float16", "float32")],
                           features=True, num_workers=0, epochs=1, shuffle_buffer=8, error_budget=1.0)

    def run():
        loader = build_webdataset_loader(cfg, 32, 2, 0, 1, 0)
        got = {k: (b["latents"][i].clone(), b["vision_features"][i].clone())
               for b in loader for i, k in enumerate(b["keys"])}
        return got, {r: n for r, n in loader.stats()["reasons"].items() if n}

    with_helper = run()
    monkeypatch.setattr(features, "_native", None)
    monkeypatch.setattr(shards, "_ustar_header", shards._ustar_fields)
    without = run()
    assert sorted(with_helper[0]) == sorted(without[0]) == [s["key"] for i, s in enumerate(samples) if i % 6 < 2]
    assert with_helper[1] == without[1] == {"bad_features": 16}
    for k, (lat, vis) in with_helper[0].items():
        assert torch.equal(lat, without[0][k][0]) and torch.equal(vis, without[0][k][1])
