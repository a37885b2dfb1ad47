"""Decoding: resize + centre crop, every colour mode to RGB, EXIF orientation, buckets, reasons."""

import io

import numpy as np
import pytest
from PIL import Image

from data_shardkit import corrupt_png_header, encode, good_jpeg, not_an_image, photo, png16_rgb, truncated_jpeg
from iomm_scale.data import BadSample, bucket_sizes, decode_image


def reference_resize_crop(im: Image.Image, size: int) -> np.ndarray:
    """The paper's preprocessing, the obvious way: shorter side to `size`, then centre crop."""
    w, h = im.size
    s = size / min(w, h)
    im = im.convert("RGB").resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float64)


def mad(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@pytest.mark.parametrize("size", [(96, 64), (64, 96), (80, 80)])
def test_shorter_side_resize_then_centre_crop(size):
    im = photo("chelsea", *size)
    out = decode_image(encode(im, "PNG"), 48)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    assert mad(out, reference_resize_crop(im, 48)) < 2.0
    if size[0] != size[1]:  # squashing instead of cropping is far off: the test can tell
        assert mad(out, np.asarray(im.resize((48, 48), Image.BICUBIC))) > 3 * mad(out, reference_resize_crop(im, 48))


@pytest.mark.parametrize("shape", [(68, 102), (102, 68), (68, 68), (48, 72)])
def test_resized_crops_come_out_channels_last(shape):
    """Landscape, portrait, square and no-resize crops: [3, 48, 48] with channels-last strides
    (so the loader's batch copy is a memcpy per row, not a transposition) and the same pixels as the
    plain [1, 3, h, w]-contiguous resample of the crop."""
    import torch
    import torch.nn.functional as F

    from iomm_scale.data.preprocess import resize_center_crop

    arr = np.asarray(photo("chelsea", shape[1], shape[0]))
    out = resize_center_crop(arr, 48, 48)
    h, w = shape
    side = min(h, w)
    # pixel-interleaved rows; a resampled crop is dense, a no-resize crop is a view of the image
    assert out.shape == (3, 48, 48) and out.stride() == (1, (48 if side != 48 else w) * 3, 3)
    top, left = (h - side) // 2, (w - side) // 2
    crop = torch.from_numpy(np.ascontiguousarray(arr[top:top + side, left:left + side])).permute(2, 0, 1)[None].contiguous()
    ref = crop[0] if side == 48 else F.interpolate(crop, size=(48, 48), mode="bicubic", antialias=True)[0]
    assert (out.int() - ref.int()).abs().max() <= 1
    # written into a batch slot instead (the loader's path): the same bytes, in place
    batch = torch.zeros(3, 3, 48, 48, dtype=torch.uint8).to(memory_format=torch.channels_last)
    assert resize_center_crop(arr, 48, 48, out=batch[1]).data_ptr() == batch[1].data_ptr()
    assert torch.equal(batch[1], out) and not batch[0].any() and not batch[2].any()
    with pytest.raises(ValueError, match="out must be a uint8"):
        resize_center_crop(arr, 48, 48, out=batch[1, :, :40])


def test_jpeg_reduced_decode_matches_full_decode():
    im = photo("astronaut", 1280, 640)  # 1/5: the draft decodes at 1/4 (320 x 160), then resizes
    data = encode(im, "JPEG", quality=92)
    fast = decode_image(data, 128)
    full = reference_resize_crop(Image.open(io.BytesIO(data)), 128)
    assert mad(fast, full) < 3.0


@pytest.mark.parametrize("size, mode, subsampling", [
    ((1024, 683), "RGB", 2), ((683, 1024), "RGB", 0), ((1536, 1024), "RGB", 2), ((4000, 2600), "RGB", 1),
    ((600, 600), "L", 0), ((1200, 900), "L", 0), ((512, 512), "RGB", 2), ((2000, 1500), "CMYK", 0)])
def test_simplejpeg_path_gives_pils_pixels(monkeypatch, size, mode, subsampling):
    """The fast JPEG decoder (simplejpeg) is bit-identical to PIL's path at every DCT scale,
    and a CMYK JPEG (which simplejpeg cannot make RGB) still decodes through PIL."""
    import iomm_scale.data.preprocess as pre

    pytest.importorskip("simplejpeg")  # a declared dependency; only a platform without wheels lacks it
    data = encode(photo("astronaut", *size).convert(mode), "JPEG", quality=90, subsampling=subsampling)
    fast = decode_image(data, 512).copy()
    used_fast = pre._decode_jpeg_fast(data, Image.open(io.BytesIO(data)), 512, 512) is not None
    assert used_fast == (mode != "CMYK")
    monkeypatch.setattr(pre, "simplejpeg", None)
    assert np.array_equal(fast, decode_image(data, 512))


def test_dct_factor_keeps_the_target_covered():
    from iomm_scale.data.preprocess import _dct_factor

    assert _dct_factor(1024, 683, 512, 512) == 1  # 6/8 would fit but is slower than a full decode
    assert _dct_factor(1536, 1024, 512, 512) == 2
    assert _dct_factor(4096, 3000, 512, 512) == 4
    assert _dct_factor(8192, 8192, 512, 512) == 8 and _dct_factor(20000, 20000, 512, 512) == 8
    assert _dct_factor(1025, 1023, 512, 512) == 2  # ceil(1023 / 2) = 512 still covers the target
    assert _dct_factor(1025, 1022, 512, 512) == 1  # ceil(1022 / 2) = 511 does not


def test_grayscale_and_1bit_become_rgb():
    gray = photo("coffee", 64, 48).convert("L")
    out = decode_image(encode(gray, "PNG"), 48)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert mad(out[..., 0], reference_resize_crop(gray, 48)[..., 0]) < 2.0
    bw = Image.new("1", (40, 40), 1)
    assert (decode_image(encode(bw, "PNG"), 32) == 255).all()


def test_rgba_and_la_are_composited_on_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 128))
    rgba.paste((0, 0, 255, 0), (0, 0, 40, 20))  # top half fully transparent
    out = decode_image(encode(rgba, "PNG"), 40).astype(int)
    assert np.abs(out[:18] - 255).max() <= 1  # transparent -> white
    assert np.abs(out[24:] - [255, 127, 127]).max() <= 2  # half-transparent red over white
    la = Image.new("LA", (40, 40), (0, 0))
    assert (decode_image(encode(la, "PNG"), 32) == 255).all()


def test_palette_with_and_without_transparency():
    rgb = photo("rocket", 64, 48)
    pal = rgb.quantize(32)
    assert pal.mode == "P"
    assert (decode_image(encode(pal, "PNG"), 40) == decode_image(encode(pal.convert("RGB"), "PNG"), 40)).all()
    p = Image.new("P", (40, 40), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (0, 20, 40, 40))
    out = decode_image(encode(p, "PNG", transparency=0), 40)  # index 0 transparent
    assert (out[:18] == 255).all() and (out[22:] == [0, 255, 0]).all()


def test_cmyk_jpeg_and_tiff():
    rgb = photo("astronaut", 64, 64)
    expected = decode_image(encode(rgb, "PNG"), 48)
    assert mad(decode_image(encode(rgb.convert("CMYK"), "TIFF"), 48), expected) < 1.0
    assert mad(decode_image(encode(rgb.convert("CMYK"), "JPEG", quality=95), 48), expected) < 4.0


def test_16bit_grayscale_and_rgb_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 48, dtype=np.float64).round().astype(np.uint16)
    g16 = np.tile(ramp, (48, 1))
    out = decode_image(encode(Image.fromarray(g16), "PNG"), 48)
    assert Image.open(io.BytesIO(encode(Image.fromarray(g16), "PNG"))).mode.startswith("I;16")
    assert np.abs(out[..., 0].astype(int) - (g16.astype(int) * 255 + 32767) // 65535).max() <= 1
    rgb16 = (np.asarray(photo("coffee", 48, 48), dtype=np.uint16) * 257)
    out = decode_image(png16_rgb(rgb16), 48)
    assert np.abs(out.astype(int) - np.asarray(photo("coffee", 48, 48), dtype=int)).max() <= 1


# EXIF orientation o -> how the camera stored the upright picture (the inverse of the fix-up)
STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    upright = photo("chelsea", 72, 48).copy()
    upright.paste((255, 0, 0), (0, 0, 24, 16))  # a red block top-left: asymmetric
    stored = upright if STORED[orientation] is None else upright.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    expected = decode_image(encode(upright, "JPEG", quality=95), 48)
    out = decode_image(data, 48)
    assert mad(out, expected) < 4.0
    # with buckets the output keeps the upright (landscape) shape
    assert decode_image(data, 48, buckets=[(48, 32), (32, 48)]).shape == (32, 48, 3)


def test_bucket_sizes_and_choice():
    assert bucket_sizes(512, [1.0, 4 / 3, 3 / 4, 16 / 9], 64) == [(512, 512), (576, 448), (448, 576), (704, 384)]
    sizes = bucket_sizes(512, [1.0, 4 / 3, 3 / 4], 64)
    tall = encode(photo("rocket", 60, 80), "PNG")
    assert decode_image(tall, 512, buckets=sizes, min_size_fraction=0).shape == (576, 448, 3)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_payload"),
    (not_an_image(0), "not_an_image"),
    (truncated_jpeg(0), "truncated_image"),
    (corrupt_png_header(0), "corrupt_header"),
    (encode(photo("coffee", 20, 30), "PNG"), "too_small"),
    (encode(photo("coffee", 64, 64), "WEBP")[:-300], "truncated_image"),  # the RIFF size says more
    # JPEGs without their end-of-image marker: cut inside the headers, or SOI + APP0 then junk
    (good_jpeg(0)[:120], "truncated_image"),
    (good_jpeg(0)[:20] + b"this is not a marker segment" * 20, "corrupt_header"),
    (good_jpeg(0)[:2] + b"junk" * 50, "not_an_image"),  # SOI alone is not the JPEG signature
])
def test_bad_payloads_raise_their_reason(data, reason):
    with pytest.raises(BadSample) as info:
        decode_image(data, 48, min_size_fraction=0.5)
    assert info.value.reason == reason


def test_size_limits():
    data = good_jpeg(0, (48, 40))
    assert decode_image(data, 64, min_size_fraction=0.5).shape == (64, 64, 3)  # upscaling within limits is fine
    with pytest.raises(BadSample, match="too_small"):
        decode_image(data, 64, min_image_size=41)
    with pytest.raises(BadSample, match="too_large"):
        decode_image(data, 32, max_image_pixels=48 * 40 - 1)


def test_max_image_pixels_above_pils_own_limit_is_honoured(monkeypatch):
    """data.webdataset.max_image_pixels above PIL's own limit had no effect: PIL refused the image
    itself (counted too_large) before our check ran. (PIL's limit lowered here to keep it small.)"""
    from iomm_scale.data.preprocess import decode_image_chw

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses over 2x this: 2000 pixels
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), (10, 20, 30)).save(buf, "PNG")  # 10,000 pixels
    assert tuple(decode_image_chw(buf.getvalue(), 64, max_image_pixels=20_000).shape) == (3, 64, 64)
    with pytest.raises(BadSample) as bad:
        decode_image_chw(buf.getvalue(), 64, max_image_pixels=5_000)  # our own limit still refuses it
    assert bad.value.reason == "too_large"
