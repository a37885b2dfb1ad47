"""Feature shards: precomputed VAE latents and frozen vision features (before masking).

One sample = `<key>.latents.npy` ([C, h, w], the VAE's scaled / shifted latents),
`<key>.vision.npy` ([T, D], the MLLM-space image tokens before the MIM mask), an optional
`<key>.txt` caption and `<key>.json` metadata ({"resolution": R, "encoders": {...}, ...}). Arrays are plain
.npy (no pickle). The trainer gets them as "latents" [B, C, h, w] and "vision_features"
[B, T, D] in the stored dtype: float32 (exact, the default) or float16 (half the disk, the
host memory and the copies; the model casts on its device). Masking still happens per
step, so one feature pass serves every epoch.

Features are only valid for the encoders that made them: two 16-channel VAEs (FLUX's and
SD3's) give latents of the same shape and different meaning. The precompute tool records
`encoder_fingerprint` (digests of the VAE and of the vision tower + projector) in every
sample's .json; the trainer compares it, and the shapes, with its own model's `FeatureSpec`
before the first step (`first_sample_problem`) and for every sample (`feature_arrays`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn

from .errors import BadSample
from .preprocess import unit_pixels
from .shards import FileSpan
from .writer import final_name, read_progress, shard_writer, write_progress

LATENTS, VISION = "latents.npy", "vision.npy"


def _npy(array, dtype: str) -> bytes:
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float32).numpy()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class FeatureSpec:
    """What a run's model takes from feature samples; a None field is not checked."""
    encoders: Optional[dict] = None  # encoder_fingerprint() of the run's VAE and vision tower
    latent_channels: Optional[int] = None  # latents [C, h, w]: h, w vary with aspect buckets
    vision_shape: Optional[tuple[int, int]] = None  # vision features [T, D]


_DIGEST_VALUES = 64  # values sampled per tensor


def module_digest(named_tensors: Iterable[tuple[str, torch.Tensor]], extra: object = None) -> str:
    """16 hex digits identifying a set of weights: every tensor's name and shape and up to 64
    evenly spaced values, rounded to bfloat16 (a float32 and a bfloat16 load of the same
    checkpoint agree; another checkpoint of the same architecture does not), plus `extra`
    (settings that change the output, as a repr). Milliseconds for a 2B-parameter model."""
    h = hashlib.sha1(repr(extra).encode())
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _DIGEST_VALUES)
        values = flat[::step][:_DIGEST_VALUES].to("cpu", torch.bfloat16).view(torch.int16).numpy()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(values.tobytes())
    return h.hexdigest()[:16]


def _language_side(name: str) -> bool:
    # the MLLM's language model and LM head: vision features do not depend on them
    return name.startswith(("lm_head.", "language_model.")) or ".language_model." in f".{name}"


def encoder_fingerprint(vae: nn.Module, conditioner: nn.Module) -> dict:
    """{"vae": digest, "vision": digest} of what feature shards store: the VAE's latents
    (weights, normalisation, posterior mode) and the MLLM's image tokens (vision tower and
    projector weights, input size and pixel normalisation; not the language model)."""
    vae_extra = (getattr(vae.cfg, "type", None), getattr(vae, "scale", None), getattr(vae, "shift", None),
                 getattr(vae.cfg, "pixel_factor", None), getattr(vae.cfg, "sample_posterior", None))
    vae_digest = module_digest(list(vae.named_parameters()) + list(vae.named_buffers()), vae_extra)
    mllm = conditioner.mllm
    vision = [(n, t) for n, t in list(mllm.named_parameters()) + list(mllm.named_buffers()) if not _language_side(n)]
    vision_extra = (conditioner.kind, conditioner.vision_size, conditioner.pixel_mean.flatten().tolist(),
                    conditioner.pixel_std.flatten().tolist(), conditioner.num_image_tokens)
    return {"vae": vae_digest, "vision": module_digest(vision, vision_extra)}


def write_feature_shards(samples: Iterable[dict], out_pattern: str, *, max_count: int = 1000,
                         max_size_mb: float = 1000.0, dtype: str = "float32", start_shard: int = 0,
                         on_shard: Optional[Callable[[str, int, int], None]] = None) -> dict:
    """Write feature samples to tar shards named `out_pattern % index` (e.g. "feat-%06d.tar"),
    indices from `start_shard` on.

    Each sample is a dict: "key" (str, unique), "latents" ([C, h, w] tensor or array),
    "vision_features" ([T, D]), "resolution" (int), optional "caption" (str or None) and
    "meta" (JSON-able dict). dtype "float16" halves the size; "float32" (default) keeps the
    values bit-exact. `on_shard(path, samples, bytes)`: after each shard got its final name,
    with the samples and payload bytes written so far by this call, all in finished shards
    (a sample that opens the next shard is not counted yet). Returns {"samples", "shards"
    (paths), "bytes"}.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out_pattern % 0)), exist_ok=True)
    shards: list[str] = []
    count = size = 0

    def shard_done(path: str) -> None:
        if on_shard is not None:
            on_shard(path, count, size)  # read now: the sample that triggered the switch is not counted yet

    with shard_writer(out_pattern, max_count, max_size_mb, start_shard, shard_done) as sink:
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
    """A .npy payload (bytes or a memoryview) as an array viewing `data`
    (no copy, never unpickles). np.load would copy and parse the header with ast: both show
    up at feature-shard speeds."""
    dtype, dims, offset = _npy_header(data)
    return np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=offset).reshape(dims)


_STORED = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}  # native byte order


def _npy_end(head: bytes) -> int:
    """Bytes from the start of a .npy payload to the end of its header (0 when `head` is too
    short to say)."""
    if len(head) < 12:
        return 0
    return 10 + struct.unpack("<H", head[8:10])[0] if head[6] == 1 else 12 + struct.unpack("<I", head[8:12])[0]


class StoredArray:
    """One feature array of a sample, parsed but not yet copied: `dtype`, `shape`, and
    `into(dst)`, which fills a tensor of that dtype and shape. From a FileSpan (a local
    shard) the bytes go straight from the page cache into `dst` (pread); from bytes in
    memory, one copy."""

    __slots__ = ("name", "dtype", "shape", "_span", "_offset", "_tensor")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, span=None, offset: int = 0,
                 tensor: Optional[torch.Tensor] = None):
        self.name, self.shape, self.dtype = name, shape, dtype
        self._span, self._offset, self._tensor = span, offset, tensor

    def into(self, dst: torch.Tensor, check: bool = False) -> torch.Tensor:
        """Fill `dst` (contiguous, this dtype and shape) with the array; with `check`,
        BadSample("bad_features") unless every value is finite. From a span with the C helper
        built, read and check are one pass (each piece checked while in cache)."""
        if self._tensor is not None:
            dst.copy_(self._tensor)
        else:
            try:
                if check and _native is not None and dst.dtype in _EXPONENT:
                    if not _pread_finite(self._span, self._offset, dst):
                        raise BadSample("bad_features", f"{self.name}: non-finite values")
                    return dst
                self._span.readinto(self._offset, dst.numpy())
            except OSError as exn:
                raise BadSample("bad_features", f"{self.name}: {exn}") from None
        if check:
            check_finite(dst, self.name)
        return dst

    def tensor(self) -> torch.Tensor:
        """The array as a tensor of its own (a view of the sample's bytes when they are in memory)."""
        if self._tensor is not None:
            return self._tensor
        return self.into(torch.empty(self.shape, dtype=self.dtype))


def _check_layout(dims: tuple[int, ...], dtype: np.dtype, ndim: int, name: str) -> None:
    if len(dims) != ndim or dtype.kind != "f" or math.prod(dims) == 0:
        raise BadSample("bad_features", f"{name}: expected a {ndim}-d float array, got {dtype} {dims}")


def stored_array(data, ndim: int, name: str) -> StoredArray:
    """A .npy member (bytes, or a shards.FileSpan of a local shard) -> StoredArray; raises
    BadSample("bad_features") unless it is a non-empty `ndim`-d float array. A span stored as
    float16 / float32 is left in the file (read later, straight into its batch slot); any
    other form is read into memory and converted to float32, as a streamed member is."""
    try:
        if isinstance(data, FileSpan):
            head = data.read(0, 256)
            if _npy_end(head) > len(head):  # a long header (many dims, padding)
                head = data.read(0, _npy_end(head))
            dtype, dims, offset = _npy_header(head)
            if dtype in _STORED:
                _check_layout(dims, dtype, ndim, name)
                if offset + math.prod(dims) * dtype.itemsize > len(data):
                    raise ValueError(f"{len(data) - offset} data bytes for {dtype} {dims}")
                return StoredArray(name, tuple(dims), _STORED[dtype], span=data, offset=offset)
            data = data.read()
        arr = npy_view(data)
    except (ValueError, TypeError, IndexError, struct.error, OSError) as exn:
        raise BadSample("bad_features", f"{name}: {type(exn).__name__}: {exn}") from None
    _check_layout(arr.shape, arr.dtype, ndim, name)
    if arr.dtype not in _STORED:  # float64, big-endian, ...: stored otherwise than we write
        arr = arr.astype(np.float32)
    with warnings.catch_warnings():  # a read-only view of the member: the batch copy only reads it
        warnings.simplefilter("ignore", UserWarning)
        return StoredArray(name, arr.shape, _STORED[arr.dtype], tensor=torch.from_numpy(arr))


# Non-finite values, by bit pattern: all exponent bits set. The C helper (_native.c, built at
# install when a compiler is there) tests the exponent in one pass. The NumPy fallback views
# the values as signed integers of the same width: a positive inf / NaN is >= the positive
# infinity's pattern (the exponent mask); a negative one, viewed as unsigned, >= the negative
# infinity's (the mask plus the sign bit): two integer max passes, no temporary.
_EXPONENT = {torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80),
             torch.float32: (torch.int32, 0x7F800000)}

try:
    from . import _native
except ImportError:  # built without a C compiler: the NumPy passes below
    _native = None


def all_finite(tensor: torch.Tensor, native: bool = True) -> bool:
    """Whether every value of a CPU float tensor is finite. float16 / bfloat16 / float32 by
    their bit patterns: one pass of the C helper when it is built (`native`), else two NumPy
    integer max passes (on the development VM 0.014 / 0.045 ms per IOMM-B feature sample,
    against 0.08 for torch.aminmax on float16, which converts every value); anything else by
    aminmax (NaN propagates through min / max, inf is an extreme)."""
    if tensor.numel() == 0:
        return True
    if tensor.dtype not in _EXPONENT or tensor.device.type != "cpu":
        low, high = torch.aminmax(tensor)
        return math.isfinite(low.item()) and math.isfinite(high.item())
    ints, inf = _EXPONENT[tensor.dtype]
    bits = tensor.detach().view(ints).numpy()
    if native and _native is not None and bits.flags.c_contiguous:
        return _native.all_finite(bits, bits.itemsize, inf)
    unsigned = bits.view(np.uint16 if bits.itemsize == 2 else np.uint32)
    negative_inf = inf | 1 << (8 * bits.itemsize - 1)
    return int(bits.max()) < inf and int(unsigned.max()) < negative_inf


def _pread_finite(span: FileSpan, start: int, dst: torch.Tensor) -> bool:
    """Fill the contiguous `dst` from the span's bytes at `start` (C helper: pread in pieces,
    each checked while in cache); whether every value is finite."""
    ints, inf = _EXPONENT[dst.dtype]
    bits = dst.view(ints).numpy()
    if start + bits.nbytes > len(span):
        raise ValueError(f"{bits.nbytes} bytes from {start} run past the member's {len(span)}")
    got, finite = _native.pread_finite(span.file.fileno(), span.offset + start, bits, bits.itemsize, inf)
    if got != bits.nbytes:
        raise OSError(f"short read: the shard file shrank while being read ({got} of {bits.nbytes} bytes)")
    return finite


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """BadSample("bad_features") unless every value is finite (all_finite)."""
    if not all_finite(tensor):
        raise BadSample("bad_features", f"{name}: non-finite values")


def feature_arrays(sample: dict, resolution: Optional[int],
                   spec: Optional[FeatureSpec] = None) -> tuple[StoredArray, StoredArray]:
    """Raw feature sample -> (latents [C, h, w], vision features [T, D]) as StoredArrays in
    their stored dtype (float16 or float32), not yet copied or checked finite (the loader
    reads them straight into their batch slots and checks them there). BadSample
    "feature_mismatch" when the sample was made for another resolution, by other encoders
    or in shapes `spec` rules out (a sample without an "encoders" record is not refused)."""
    if LATENTS not in sample or VISION not in sample:
        raise BadSample("missing_image", f"feature sample lacks {LATENTS} / {VISION}")
    made: dict = {}
    if (resolution is not None or spec is not None) and "json" in sample:
        try:
            made = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            raise BadSample("bad_features", "unparseable .json") from None
        if not isinstance(made, dict):
            raise BadSample("bad_features", ".json is not an object")
    made_for = made.get("resolution")
    if resolution is not None and made_for is not None and made_for != resolution:
        raise BadSample("feature_mismatch", f"made at {made_for} px, training at {resolution} px")
    lat, vis = stored_array(sample[LATENTS], 3, LATENTS), stored_array(sample[VISION], 2, VISION)
    if spec is not None:
        made_by = made.get("encoders")
        if made_by is not None and not isinstance(made_by, dict):
            raise BadSample("bad_features", ".json: 'encoders' is not an object")
        if spec.encoders is not None and made_by is not None and made_by != spec.encoders:
            other = [k for k in sorted(set(spec.encoders) | set(made_by)) if made_by.get(k) != spec.encoders.get(k)]
            raise BadSample("feature_mismatch", "made by other encoders: " + ", ".join(
                f"{k} {made_by.get(k)} (this run's: {spec.encoders.get(k)})" for k in other))
        if spec.latent_channels is not None and lat.shape[0] != spec.latent_channels:
            raise BadSample("feature_mismatch", f"latents have {lat.shape[0]} channels, this run's VAE makes "
                                                f"{spec.latent_channels}")
        if spec.vision_shape is not None and tuple(vis.shape) != tuple(spec.vision_shape):
            raise BadSample("feature_mismatch", f"vision features are {list(vis.shape)}, this run's vision tower "
                                                f"makes {list(spec.vision_shape)} (tokens x hidden)")
    return lat, vis


def first_sample_problem(url: str, resolution: Optional[int], spec: Optional[FeatureSpec]) -> Optional[str]:
    """Why the first sample of feature shard `url` does not suit this run ("feature_mismatch"),
    "unrecorded" when it carries no encoder record, else None. A shard or sample that does not
    read is left to the loader, which skips and counts it."""
    from .shards import read_shard

    samples = read_shard(url)
    try:
        sample = next(samples, None)
        if sample is None:
            return None
        feature_arrays(sample, resolution, spec)
        made = json.loads(sample["json"]) if "json" in sample else {}
    except BadSample as bad:
        return bad.detail if bad.reason == "feature_mismatch" else None
    except Exception:  # unreadable: counted by the loader (shard_error / bad_features)
        return None
    finally:
        samples.close()  # stop reading (a pipe: URL's process is ended)
    return "unrecorded" if spec is not None and spec.encoders is not None and "encoders" not in made else None


def decode_features(sample: dict, resolution: Optional[int], check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw feature sample -> (latents [C, h, w], vision features [T, D]) tensors in their
    stored dtype (float16 or float32; read-only views of the sample's bytes when they are in
    memory), checked finite unless `check=False`."""
    lat, vis = (a.tensor() for a in feature_arrays(sample, resolution))
    if check:
        check_finite(lat, LATENTS)
        check_finite(vis, VISION)
    return lat, vis


def precompute_feature_shards(loader, encode_latents, encode_vision, out_pattern: str,
                              resolution: int, *, device="cpu", dtype: str = "float32", max_count: int = 1000,
                              max_size_mb: float = 1000.0, meta: Optional[dict] = None,
                              progress: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run a raw-image loader once through the frozen encoders and write feature shards.

    `encode_latents(pixels) -> [B, C, h, w]` and `encode_vision(pixels) -> [B, T, D]` get
    the loader's pixels in [-1, 1] on `device`; keys and captions are carried over (None
    captions stay image-only). `meta` goes into every sample's .json (the tool puts the
    encoders' fingerprint and the resize filter there). Returns write_feature_shards'
    summary plus the loader's bad-data stats (bad images are skipped and counted here, once,
    not every epoch) and "resumed" (None, or where a resumed pass started).

    `progress`: a JSON file, rewritten (atomically) each time a shard got its final name, with
    where the loader stood before the batch of the sample that opened the next shard. A pass
    stopped anywhere (crash, kill, preemption) and started again with the same arguments goes
    on from the shard it was writing (its `.partial` is rewritten); the shards come out byte
    for byte as an uninterrupted pass's, the counts the same. A finished pass is not redone.
    Other arguments than the recorded ones are refused (ValueError naming them), and the
    loader refuses a state from another setup (other shards, batch size, ...). `log(line)`:
    one line per finished shard (samples so far, this pass's samples/s), for long passes.
    """
    job = json.loads(json.dumps({"out": out_pattern, "resolution": resolution, "dtype": dtype,
                                 "max_count": max_count, "max_size_mb": max_size_mb, "meta": meta}))
    before = {"samples": 0, "shards": [], "bytes": 0}
    skip, start_shard, resumed = 0, 0, None
    saved = read_progress(progress, job) if progress else None
    if saved is not None:
        before = saved["summary"]
        if saved["done"]:
            return {**before, "stats": saved["stats"], "resumed": "complete"}
        try:
            loader.load_state_dict(saved["loader"])
        except ValueError as e:
            raise ValueError(f"progress file {progress}: {e}") from None
        skip, start_shard = saved["skip"], saved["next_shard"]
        resumed = {"shard": start_shard, "samples": before["samples"]}
    at: dict = {}  # the sample being written: the loader's state before its batch, its index in it
    yielded = 0

    def samples():
        nonlocal yielded
        # the loader's position before each batch (without `progress` any iterable of batches will do)
        state, first = loader.state_dict() if progress else None, True
        for batch in loader:
            pixels = unit_pixels(batch["pixels"].to(device))
            with torch.no_grad():
                lat, vis = encode_latents(pixels).float().cpu(), encode_vision(pixels).float().cpu()
            for i, key in enumerate(batch["keys"]):
                if first and i < skip:  # written before the resume, into shards already final
                    continue
                at.update(state=state, index=i)
                yielded += 1
                yield {"key": key, "latents": lat[i], "vision_features": vis[i], "caption": batch["captions"][i],
                       "resolution": resolution, "meta": meta}
            state, first = loader.state_dict() if progress else None, False

    finished: list[str] = []  # this pass's final shards that hold samples
    counted = 0  # the samples in them

    started = time.perf_counter()

    def shard_done(path: str, samples_done: int, bytes_done: int) -> None:
        nonlocal counted
        if samples_done > counted:  # an empty last shard is left out, as write_feature_shards does
            finished.append(path)
            counted = samples_done
            if log is not None:
                log(f"{os.path.basename(path)} done: {before['samples'] + samples_done} samples so far, "
                    f"{samples_done / max(time.perf_counter() - started, 1e-9):.1f} samples/s")
        if progress is None:
            return
        record = {"job": job, "stats": loader.stats(),
                  "summary": {"samples": before["samples"] + samples_done, "shards": before["shards"] + finished,
                              "bytes": before["bytes"] + bytes_done}}
        if yielded > samples_done:  # a sample in flight opens the next shard: resume at it
            record.update(done=False, loader=at["state"], skip=at["index"], next_shard=start_shard + len(finished))
        else:  # the writer's close: everything is in final shards
            record.update(done=True)
        write_progress(progress, record)

    summary = write_feature_shards(samples(), out_pattern, max_count=max_count, max_size_mb=max_size_mb, dtype=dtype,
                                   start_shard=start_shard, on_shard=shard_done)
    stats = getattr(loader, "stats", None)
    return {"samples": before["samples"] + summary["samples"], "shards": before["shards"] + summary["shards"],
            "bytes": before["bytes"] + summary["bytes"], "stats": stats() if stats else {}, "resumed": resumed}
