"""Feature shards: precomputed VAE latents and frozen vision features (before masking).

One sample = `<key>.latents.npy` ([C, h, w], the VAE's scaled / shifted latents),
`<key>.vision.npy` ([T, D], the MLLM-space image tokens before the MIM mask), an optional
`<key>.txt` caption and `<key>.json` metadata ({"resolution": R, ...}). Arrays are plain
.npy (no pickle). The trainer gets them as "latents" [B, C, h, w] and "vision_features"
[B, T, D] in the stored dtype: float32 (exact, the default) or float16 (half the disk, the
host memory and the copies; the model casts on its device). Masking still happens per
step, so one feature pass serves every epoch.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import warnings
from typing import Iterable, Optional

import numpy as np
import torch

from .errors import BadSample
from .preprocess import unit_pixels
from .writer import final_name, shard_writer

LATENTS, VISION = "latents.npy", "vision.npy"


def _npy(array, dtype: str) -> bytes:
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float32).numpy()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def write_feature_shards(samples: Iterable[dict], out_pattern: str, *, max_count: int = 1000,
                         max_size_mb: float = 1000.0, dtype: str = "float32") -> dict:
    """Write feature samples to tar shards named `out_pattern % index` (e.g. "feat-%06d.tar").

    Each sample is a dict: "key" (str, unique), "latents" ([C, h, w] tensor or array),
    "vision_features" ([T, D]), "resolution" (int), optional "caption" (str or None) and
    "meta" (JSON-able dict). dtype "float16" halves the size; "float32" (default) keeps the
    values bit-exact. Returns {"samples", "shards" (paths), "bytes"}.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out_pattern % 0)), exist_ok=True)
    shards: list[str] = []
    count = size = 0
    with shard_writer(out_pattern, max_count, max_size_mb) as sink:
        for s in samples:
            lat, vis = s["latents"], s["vision_features"]
            if len(lat.shape) != 3 or len(vis.shape) != 2:
                raise ValueError(f"{s['key']}: latents must be [C, h, w] and vision_features [T, D], got "
                                 f"{tuple(lat.shape)} and {tuple(vis.shape)}")
            meta = {"resolution": int(s["resolution"]), **(s.get("meta") or {})}
            record = {"__key__": s["key"], LATENTS: _npy(lat, dtype), VISION: _npy(vis, dtype),
                      "json": json.dumps(meta).encode()}
            if s.get("caption") is not None:
                record["txt"] = s["caption"].encode("utf-8")
            sink.write(record)
            if final_name(sink.fname) not in shards:
                shards.append(final_name(sink.fname))
            count += 1
            size += sum(len(v) for k, v in record.items() if not k.startswith("__"))
    return {"samples": count, "shards": shards, "bytes": size}


_DESCR = re.compile(rb"""['"]descr['"]\s*:\s*['"]([^'"]+)['"]""")
_FORTRAN = re.compile(rb"""['"]fortran_order['"]\s*:\s*(True|False)""")
_SHAPE = re.compile(rb"""['"]shape['"]\s*:\s*\(([^)]*)\)""")


_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}  # .npy header -> (dtype, shape, data offset)


def _npy_header(data) -> tuple[np.dtype, tuple[int, ...], int]:
    if bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy payload")
    if data[6] == 1:
        (hlen,), start = struct.unpack("<H", data[8:10]), 10
    else:
        (hlen,), start = struct.unpack("<I", data[8:12]), 12
    header = bytes(data[start:start + hlen])
    known = _HEADERS.get(header)  # every sample of a shard set has the same few headers
    if known is not None:
        return known
    descr, fortran, shape = _DESCR.search(header), _FORTRAN.search(header), _SHAPE.search(header)
    if not (descr and fortran and shape):
        raise ValueError("unparseable .npy header")
    dims = tuple(int(x) for x in shape.group(1).split(b",") if x.strip())
    if fortran.group(1) == b"True" and len(dims) > 1:
        raise ValueError("Fortran-ordered array")
    parsed = (np.dtype(descr.group(1).decode()), dims, start + hlen)
    if len(_HEADERS) < 256:
        _HEADERS[header] = parsed
    return parsed


def npy_view(data) -> np.ndarray:
    """A .npy payload (bytes or a memoryview of a mapped shard) as an array viewing `data`
    (no copy, never unpickles). np.load would copy and parse the header with ast: both show
    up at feature-shard speeds."""
    dtype, dims, offset = _npy_header(data)
    return np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=offset).reshape(dims)


_STORED = (np.dtype(np.float16), np.dtype(np.float32))


def _load(data: bytes, ndim: int, name: str) -> torch.Tensor:
    try:
        arr = npy_view(data)
    except (ValueError, TypeError, struct.error) as exn:
        raise BadSample("bad_features", f"{name}: {type(exn).__name__}: {exn}") from None
    if arr.ndim != ndim or arr.dtype.kind != "f" or arr.size == 0:
        raise BadSample("bad_features", f"{name}: expected a {ndim}-d float array, got {arr.dtype} {arr.shape}")
    if arr.dtype not in _STORED:  # float64, big-endian, ...: stored otherwise than we write
        arr = arr.astype(np.float32)
    with warnings.catch_warnings():  # a read-only view of the tar member: the batch copy only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """BadSample("bad_features") unless every value is finite: one pass, no temporary (NaN
    propagates through min / max, inf is an extreme)."""
    low, high = torch.aminmax(tensor)
    if not (math.isfinite(low.item()) and math.isfinite(high.item())):
        raise BadSample("bad_features", f"{name}: non-finite values")


def decode_features(sample: dict, resolution: Optional[int], check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw feature sample -> (latents [C, h, w], vision features [T, D]) in their stored
    dtype (float16 or float32), as read-only views of the sample's bytes. `check=False` leaves
    the finite check (check_finite) to the caller: the loader runs it on the sample's copy in
    its batch slot, while the copy is still in cache."""
    if LATENTS not in sample or VISION not in sample:
        raise BadSample("missing_image", f"feature sample lacks {LATENTS} / {VISION}")
    if resolution is not None and "json" in sample:
        try:
            made_for = json.loads(sample["json"]).get("resolution")
        except (ValueError, AttributeError):
            raise BadSample("bad_features", "unparseable .json") from None
        if made_for is not None and made_for != resolution:
            raise BadSample("feature_mismatch", f"made at {made_for} px, training at {resolution} px")
    lat, vis = _load(sample[LATENTS], 3, LATENTS), _load(sample[VISION], 2, VISION)
    if check:
        check_finite(lat, LATENTS)
        check_finite(vis, VISION)
    return lat, vis


def precompute_feature_shards(loader: Iterable[dict], encode_latents, encode_vision, out_pattern: str,
                              resolution: int, *, device="cpu", dtype: str = "float32", max_count: int = 1000,
                              max_size_mb: float = 1000.0) -> dict:
    """Run a raw-image loader once through the frozen encoders and write feature shards.

    `encode_latents(pixels) -> [B, C, h, w]` and `encode_vision(pixels) -> [B, T, D]` get
    the loader's pixels in [-1, 1] on `device`; keys and captions are carried over (None
    captions stay image-only). Returns write_feature_shards' summary plus the loader's
    bad-data stats (bad images are skipped and counted here, once, not every epoch).
    """

    def samples():
        for batch in loader:
            pixels = unit_pixels(batch["pixels"].to(device))
            with torch.no_grad():
                lat, vis = encode_latents(pixels).float().cpu(), encode_vision(pixels).float().cpu()
            for i, key in enumerate(batch["keys"]):
                yield {"key": key, "latents": lat[i], "vision_features": vis[i], "caption": batch["captions"][i],
                       "resolution": resolution}

    summary = write_feature_shards(samples(), out_pattern, max_count=max_count, max_size_mb=max_size_mb, dtype=dtype)
    stats = getattr(loader, "stats", None)
    summary["stats"] = stats() if stats else {}
    return summary
