"""Decode one image sample to an RGB uint8 array of the training size.

As the paper: shorter side resized to the resolution, then a centre crop (or, with
aspect-ratio buckets, cover the nearest bucket and centre-crop to it). Every PIL mode ends
as RGB: grayscale and 1-bit are replicated, palette expanded, transparent images
(RGBA, LA, PA, palette + transparency) composited on white, CMYK / YCbCr / LAB / HSV
converted, 16-bit rounded to 8-bit (not clipped). EXIF orientation is applied.

Speed (benchmarks/bench_data.py): JPEGs (YCbCr or grayscale) are decoded by simplejpeg
(libjpeg-turbo, about 1.5x faster than PIL's decode + convert for the same pixels) when it is
installed, else by PIL; either way at a reduced DCT scale (1/2, 1/4, 1/8) when the source is
at least twice the target. Any JPEG simplejpeg refuses goes through PIL, which then
classifies what is wrong with it. Only the crop is resampled, in one antialiased pass
with torch's vectorised uint8 kernel on a channels-last copy of the crop: bicubic by
default (PIL's bicubic within ~0.01 grey levels on average, ~5x faster than `Image.resize`)
or bilinear (`resize_filter`, as the diffusers / torchvision scripts; about the same cost
here); the EXIF rotation is applied to the small result, not the source.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import BadSample

try:  # optional: libjpeg-turbo without PIL's per-image overhead (pip install simplejpeg)
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the platform's wheels
    simplejpeg = None

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif", "image")
CAPTION_JSON_FIELDS = ("caption", "text", "prompt")

# Magic bytes of formats PIL reads: a payload that starts with one of these but does not
# open has a corrupt header; anything else is not an image at all.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

# EXIF orientation -> the transform of a [C, H, W] tensor that undoes it (as
# PIL.ImageOps.exif_transpose does on the image).
_ORIENTATION = {
    2: lambda t: t.flip(2),  # mirrored
    3: lambda t: t.flip(1, 2),  # rotated 180
    4: lambda t: t.flip(1),  # flipped
    5: lambda t: t.transpose(1, 2),  # transposed
    6: lambda t: t.rot90(-1, (1, 2)),  # stored turned counter-clockwise: turn clockwise
    7: lambda t: t.flip(1, 2).transpose(1, 2),  # transverse
    8: lambda t: t.rot90(1, (1, 2)),  # stored turned clockwise: turn counter-clockwise
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def bucket_sizes(resolution: int, ratios: Sequence[float], multiple: int) -> list[tuple[int, int]]:
    """(width, height) per aspect ratio, area about resolution^2, sides multiples of `multiple`."""
    out = []
    for a in ratios:
        w = max(multiple, round(resolution * math.sqrt(a) / multiple) * multiple)
        h = max(multiple, round(resolution / math.sqrt(a) / multiple) * multiple)
        out.append((w, h))
    return out


def pick_bucket(width: int, height: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to width / height."""
    a = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - a), s))


def looks_like_image(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or (
        len(data) > 1 and data[:1] == b"P" and data[1:2] in b"123456")


def looks_truncated(data: bytes) -> bool:
    """A JPEG without its end-of-image marker, a PNG without its IEND chunk near the end, or a
    WebP shorter than its RIFF header's size field says."""
    if data.startswith(b"\xff\xd8\xff"):
        return b"\xff\xd9" not in data[-64:]
    if data.startswith(b"\x89PNG"):
        return b"IEND" not in data[-64:]
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    return False


def jpeg_header_end(data: bytes) -> str:
    """Walk a JPEG's marker segments from SOI to the start of scan: "scan" when the headers are
    whole, "cut" when the data ends inside them, "corrupt" when a segment is not a marker (or
    the image ends before any scan)."""
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return "corrupt"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0x00, 0xD9):  # a stuffed byte or the end of image before any scan
            return "corrupt"
        if i + 4 > n:
            return "cut"
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return "corrupt"
        if marker == 0xDA:
            return "scan" if i + 2 + length <= n else "cut"
        i += 2 + length
    return "cut"


def failure_reason(data: bytes, exn: BaseException) -> str:
    """Why PIL could not read `data`: truncated / corrupt header / not an image at all. A JPEG
    whose headers are cut short is truncated; one whose headers hold junk is corrupt (both lack
    the end-of-image marker, so the marker walk tells them apart)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "truncated_image" if jpeg_header_end(data) == "cut" or "truncated" in str(exn) else "corrupt_header"
    if "truncated" in str(exn) or (looks_like_image(data) and looks_truncated(data)):
        return "truncated_image"
    return "corrupt_header" if looks_like_image(data) else "not_an_image"


def image_member(sample: dict) -> tuple[str, bytes]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    raise BadSample("missing_image", f"members: {sorted(k for k in sample if not k.startswith('__'))}")


def caption_of(sample: dict) -> str:
    """The caption of a paired sample: .txt, else the first of caption / text / prompt in .json."""
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace")
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as exn:
            raise BadSample("missing_caption", f"unparseable .json: {exn}") from None
        found = [meta[k] for k in CAPTION_JSON_FIELDS if isinstance(meta, dict) and isinstance(meta.get(k), str)]
        if not found:
            raise BadSample("missing_caption", f".json has none of {CAPTION_JSON_FIELDS}")
        text = found[0]
    else:
        raise BadSample("missing_caption", "no .txt or .json member")
    text = text.strip()
    if not text:
        raise BadSample("empty_caption")
    return text


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
        return value if value in _ORIENTATION else 1
    except Exception:  # a broken EXIF block is not worth rejecting the image
        return 1


def _normalise_mode(im: Image.Image) -> Image.Image:
    """-> mode L, RGB or RGBA (RGBA only when there is transparency to composite)."""
    mode = im.mode
    if mode in ("RGB", "L", "RGBA"):
        return im
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(im).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")
    if mode == "F":
        return Image.fromarray(np.asarray(im).clip(0, 255).round().astype(np.uint8), "L")
    if mode == "1":
        return im.convert("L")
    if mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode in ("LA", "La", "PA", "RGBa"):
        return im.convert("RGBA")
    if mode == "RGBX":
        return im.convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> RGB (transparency composited on white)."""
    im = _normalise_mode(im)
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


RESIZE_FILTERS = ("bilinear", "bicubic")


def _resample_aa(x: torch.Tensor, height: int, width: int, resize_filter: str,
                 out: Optional[torch.Tensor]) -> torch.Tensor:
    """Antialiased resample of a [1, 3, h, w] uint8 batch, into `out` ([1, 3, height, width])
    when given: the aten op's out= variant writes a channels-last batch slot in place, which
    saves the fresh output's page faults and the copy into the batch (0.15-0.2 ms per 512 px
    sample on the development VM)."""
    if out is not None:
        op = getattr(torch._C._nn, f"_upsample_{resize_filter}2d_aa", None)
        if op is not None:
            return op(x, (height, width), False, None, None, out=out)
    y = F.interpolate(x, size=(height, width), mode=resize_filter, antialias=True, align_corners=False)
    return y if out is None else out.copy_(y)


def resize_center_crop(arr: np.ndarray, width: int, height: int, resize_filter: str = "bicubic",
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, height, width] uint8 tensor in channels-last memory (strides
    (1, 3 width, 3), as the loader's batches): scale to cover (shorter side fits), centre
    crop. Only the crop is resampled (antialiased bilinear or bicubic). When no resize is
    needed the result is a view of `arr`. `out`: a [3, height, width] uint8 tensor (a batch
    slot) to write the result into, and return."""
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"resize_filter must be one of {RESIZE_FILTERS}, got {resize_filter!r}")
    if out is not None and (tuple(out.shape) != (3, height, width) or out.dtype != torch.uint8):
        raise ValueError(f"out must be a uint8 [3, {height}, {width}] tensor, got {out.dtype} {list(out.shape)}")
    h, w = arr.shape[:2]
    scale = max(width / w, height / h)
    cw, ch = min(w, max(1, round(width / scale))), min(h, max(1, round(height / scale)))
    left, top = (w - cw) // 2, (h - ch) // 2
    sub = arr[top:top + ch, left:left + cw]
    with warnings.catch_warnings():  # PIL's arrays are read-only; nothing writes to this view
        warnings.simplefilter("ignore", UserWarning)
        if (cw, ch) == (width, height):
            view = torch.from_numpy(sub).permute(2, 0, 1)
            return view if out is None else out.copy_(view)
        # The resampler's fast path wants a dense channels-last [1, 3, ch, cw] input (then its
        # output is channels-last too, and stays so: making it [3, h, w]-contiguous cost a
        # transposing copy, ~0.4 ms at 512 px). A crop of a wider image is made dense by numpy's
        # row copy (torch's strided copy with 3-byte pixels took ~1.3 ms); the batch stride is
        # set explicitly: crop[None] has stride 3 there, which sent interpolate down its slow
        # path with an NCHW output (1.9 vs 1.3 ms for a 683 px crop).
        dense = torch.from_numpy(np.ascontiguousarray(sub))
    x = dense.as_strided((1, 3, ch, cw), (3 * ch * cw, 1, 3 * cw, 3))
    return _resample_aa(x, height, width, resize_filter, None if out is None else out[None])[0]


def _dct_factor(sw: int, sh: int, tw: int, th: int) -> int:
    """The largest of 1, 2, 4, 8 that keeps a (sw, sh) JPEG at least (tw, th) when decoded at
    1/factor scale. libjpeg's other M/8 scales (e.g. 6/8) are slower than a full decode."""
    f = 8
    while f > 1 and (math.ceil(sw / f) < tw or math.ceil(sh / f) < th):
        f //= 2
    return f


def _decode_jpeg_fast(data: bytes, im: Image.Image, tw: int, th: int) -> Optional[np.ndarray]:
    """simplejpeg's decode of a YCbCr / grayscale JPEG at the DCT scale for a (tw, th) target,
    as [H, W, 3] uint8; None when simplejpeg is missing, the JPEG is CMYK, or simplejpeg
    refuses it (then PIL decodes, or names the fault)."""
    if simplejpeg is None or im.mode not in ("RGB", "L"):
        return None
    sw, sh = im.size
    f = _dct_factor(sw, sh, tw, th)
    try:
        return simplejpeg.decode_jpeg(data, "RGB", min_width=math.ceil(sw / f), min_height=math.ceil(sh / f))
    except (ValueError, RuntimeError):
        return None


def decode_image_chw(data: bytes, resolution: int, *, buckets: Optional[Sequence[tuple[int, int]]] = None,
                     min_size_fraction: float = 0.0, min_image_size: int = 0,
                     max_image_pixels: int = 178_956_970, resize_filter: str = "bicubic",
                     slot_for: Optional[Callable[[tuple[int, int, int]], torch.Tensor]] = None) -> torch.Tensor:
    """Image bytes -> uint8 tensor [3, H, W] of the target size (square `resolution`, or the
    nearest bucket), channels-last. Raises BadSample with the reason when the image is
    unusable. `slot_for(shape)`: called once the image is known good and its target size
    known, returns the tensor (a batch slot) to write the result into, which is returned."""
    if len(data) == 0:
        raise BadSample("empty_payload")
    if Image.MAX_IMAGE_PIXELS is not None and max_image_pixels > Image.MAX_IMAGE_PIXELS:
        # PIL refuses images over twice its own limit before our check runs: let ours govern
        Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exn:
        raise BadSample("too_large", str(exn)) from None
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as exn:
        detail = re.sub(r" <[^>]*>", "", str(exn))  # PIL names the BytesIO object: noise in logs
        raise BadSample(failure_reason(data, exn), f"{type(exn).__name__}: {detail}") from None
    sw, sh = im.size
    if sw * sh > max_image_pixels:
        raise BadSample("too_large", f"{sw}x{sh}")
    orientation = _orientation(im)
    swap = orientation in (5, 6, 7, 8)  # a quarter turn: the displayed image is h x w
    ow, oh = (sh, sw) if swap else (sw, sh)
    tw, th = pick_bucket(ow, oh, buckets) if buckets else (resolution, resolution)
    min_side = max(min_image_size, min_size_fraction * min(tw, th))
    if min(ow, oh) < min_side:
        raise BadSample("too_small", f"{ow}x{oh}, shorter side < {min_side:g}")
    # Work in source orientation; rotate the small result at the end.
    tws, ths = (th, tw) if swap else (tw, th)
    arr = _decode_jpeg_fast(data, im, tws, ths) if im.format == "JPEG" else None
    try:
        if arr is None:
            if im.format == "JPEG":
                scale = max(tws / sw, ths / sh)
                im.draft("RGB", (math.ceil(sw * scale), math.ceil(sh * scale)))  # DCT-domain downscale
            arr = np.asarray(to_rgb(im))  # the decode happens here
    except Image.DecompressionBombError as exn:
        raise BadSample("too_large", str(exn)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exn:
        reason = "truncated_image" if "truncated" in str(exn) or looks_truncated(data) else "decode_error"
        raise BadSample(reason, f"{type(exn).__name__}: {exn}") from None
    slot = None if slot_for is None else slot_for((3, th, tw))
    if orientation in _ORIENTATION:  # resampled in source orientation, then turned into the slot
        out = _ORIENTATION[orientation](resize_center_crop(arr, tws, ths, resize_filter))
        return out if slot is None else slot.copy_(out)
    return resize_center_crop(arr, tws, ths, resize_filter, out=slot)


def unit_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Batch pixels in [-1, 1]. The webdataset loader hands out uint8 [0, 255] in channels-last
    memory (a quarter of float32's bytes to fill, share between processes and copy to the
    device; each sample one memcpy into its batch slot); models call this on their device,
    which converts in one pass to contiguous float32 x / 127.5 - 1. Float pixels (the built-in
    set, sampling references) pass through unchanged."""
    if pixels.dtype != torch.uint8:
        return pixels
    return pixels.to(dtype=torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def decode_image(data: bytes, resolution: int, **kw) -> np.ndarray:
    """As decode_image_chw, as a [H, W, 3] uint8 array (a view)."""
    return decode_image_chw(data, resolution, **kw).permute(1, 2, 0).numpy()
