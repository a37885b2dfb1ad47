"""Helpers for the data tests: real images (scikit-image's bundled photos), real encodings,
real webdataset tar shards, and the corruptions the reader must survive."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from functools import lru_cache

import numpy as np
import webdataset as wds
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


@lru_cache(maxsize=None)
def photo(name: str, width: int, height: int) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((width, height), Image.BICUBIC)


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def good_jpeg(i: int, size=(48, 40)) -> bytes:
    return encode(photo(PHOTOS[i % len(PHOTOS)], *size), "JPEG", quality=90)


def png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ---- corruptions -------------------------------------------------------------------------
def truncated_jpeg(i: int) -> bytes:
    data = good_jpeg(i)
    return data[: len(data) // 2]


def corrupt_png_header(i: int) -> bytes:
    data = bytearray(encode(photo(PHOTOS[i % len(PHOTOS)], 40, 40), "PNG"))
    data[29] ^= 0xFF  # IHDR CRC: the signature still says PNG
    return bytes(data)


def not_an_image(i: int) -> bytes:
    return f"<html><body>404 not found {i}</body></html>".encode()


def too_small_jpeg(i: int) -> bytes:
    return encode(photo(PHOTOS[i % len(PHOTOS)], 10, 8), "JPEG")


def write_shard(path: str, samples: list[dict]) -> None:
    with wds.TarWriter(path, encoder=False, mtime=0) as w:
        for s in samples:
            w.write({k: (v.encode() if isinstance(v, str) and not k.startswith("__") else v) for k, v in s.items()})


def write_clean_shards(folder, n_shards: int, per_shard: int, prefix: str = "img", captions: bool = True,
                       sizes=((48, 40),)) -> tuple[str, list[str]]:
    """n_shards x per_shard good samples; returns (brace pattern, keys)."""
    keys = []
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            key = f"{prefix}{i:05d}"
            sample = {"__key__": key, "jpg": good_jpeg(i, sizes[i % len(sizes)])}
            if captions:
                sample["txt"] = f"photo number {i}"
            samples.append(sample)
            keys.append(key)
        write_shard(str(folder / f"{prefix}-{s:06d}.tar"), samples)
    return str(folder / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar"), keys


def truncate_tar_in_member(path: str, member_index: int) -> int:
    """Cut a shard in the middle of a member's data; returns how many whole samples
    (jpg + txt) precede that member's sample."""
    with tarfile.open(path) as t:
        members = t.getmembers()
    m = members[member_index]
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: m.offset_data + m.size // 2])
    keys = []
    for x in members[:member_index]:
        k = x.name.split(".")[0]
        if k not in keys:
            keys.append(k)
    cut_key = m.name.split(".")[0]
    return len([k for k in keys if k != cut_key])
