"""Webdataset training streams: rank / worker split, shuffling, the image-only / paired
mixture, preprocessing, aspect buckets, bad-data counting, exact mid-epoch resume.

    loader = build_webdataset_loader(cfg, resolution=512, batch_size=32, rank=r, world_size=n, seed=0)
    for batch in loader:          # {"pixels" uint8 [B,3,R,R], "captions", "keys"} (unit_pixels -> [-1, 1])
        ...                       # (feature shards: "latents", "vision_features" instead of pixels)
        ckpt["data"] = loader.state_dict()
    loader.load_state_dict(ckpt["data"])   # in a new process: continues exactly

How samples are dealt. There are S = world_size x max(1, num_workers) slots; slot
s = rank x workers + worker. Each epoch the shards are permuted by (seed, epoch) and dealt
round-robin to the slots (when there are fewer shards than slots, every slot reads all of
them and keeps every S-th sample instead). A slot reads its shards in order and shuffles
consecutive chunks of `shuffle_buffer` samples with a permutation drawn from
(seed, stream, epoch, slot, chunk). With both image-only and paired shards, draw d of a
slot is image-only with probability lambda, from a uniform number drawn from
(seed, slot, d). Each worker forms whole batches (per aspect bucket) and the DataLoader
returns them round-robin over the workers, in order.

The guarantee (exact):
  * Every epoch (without `resample`) each sample of the shard set goes to exactly one
    (rank, worker) and is yielded exactly once, unless it is bad (skipped and counted).
  * The sequence of batches is a pure function of (shards, seed, rank, world_size,
    num_workers, batch_size, resolution, the options): the same on every run.
  * After `load_state_dict(state_dict())`, in a new process, the loader yields exactly the
    batches the uninterrupted loader would have yielded next, in the same order:
    nothing repeated, nothing skipped, pixel for pixel. Every batch carries its worker's
    position (epoch, chunk start location, offset in chunk, draw counter, the samples
    waiting in partially filled buckets), so a resume re-reads at most one chunk per
    stream (raw bytes, not decoded) plus the chunks holding bucketed samples. A resume
    needs the same rank, world size, worker count, batch size, resolution, seed, shard
    list and options; `load_state_dict` refuses anything else (or, with strict=False,
    restarts at the saved epoch, losing exactness).
  * Shard errors and bad samples are counted once, also across resumes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import WebDatasetConfig, parse_bucket
from .errors import BadDataCounter, BadSample, DataErrorBudgetExceeded, check_budget, merge_stats
from .features import LATENTS, VISION, FeatureSpec, feature_arrays
from .preprocess import bucket_sizes, caption_of, decode_image_chw, image_member
from .shards import ChunkedShuffle, SlotPlan, expand_shards

log = logging.getLogger("iomm_scale.data")

IMAGE, PAIRED = 0, 1
STREAM_NAMES = {IMAGE: "image", PAIRED: "paired"}
_DRAW_BLOCK = 1024  # mixture draws come in blocks drawn from (seed, slot, block)


class _Worker:
    """The batches of one (rank, worker) slot, resumable from a state dict."""

    def __init__(self, cfg: WebDatasetConfig, urls: dict[int, list[str]], resolution: int, batch_size: int,
                 feature_spec: Optional[FeatureSpec], rank: int, workers: int, world_size: int, seed: int,
                 logical: int, state: Optional[dict], release_flags: Optional[torch.Tensor] = None):
        state = state or {}
        self.cfg, self.resolution, self.batch_size = cfg, resolution, batch_size
        self.feature_spec = feature_spec
        slot, num_slots = rank * workers + logical, world_size * workers
        self.slot, self.seed, self.logical = slot, seed, logical
        self.where = f"on rank {rank}, data worker {logical}"
        self.counter = BadDataCounter(cfg.warn_first, cfg.warn_interval_s, state.get("stats"))
        saved = state.get("streams", {})
        self.streams = {
            sid: ChunkedShuffle(SlotPlan(tuple(u), sid, seed, slot, num_slots, cfg.resample,
                                             views=(LATENTS, VISION) if cfg.features else ()), cfg.shuffle_buffer,
                                cfg.epochs, self.counter.shard_error, saved.get(str(sid)))
            for sid, u in urls.items() if u}
        self.lam = cfg.image_only_fraction if PAIRED in self.streams else 1.0
        self.draws = int(state.get("draws", 0))
        self.batches = int(state.get("batches", 0))
        self.done = bool(state.get("done", False))
        # streams whose last epoch ended (finite epochs): the mixture draws from the others until
        # every stream is through, so no sample of the longer stream is left unread
        self.exhausted = {int(sid) for sid in state.get("exhausted", [])}
        if len(self.streams) == 2 and self.lam in (0.0, 1.0):  # a stream the mixture never draws is not read
            self.exhausted.add(IMAGE if self.lam == 0.0 else PAIRED)
        self.buckets_px = bucket_sizes(resolution, [parse_bucket(b) for b in cfg.buckets], cfg.bucket_multiple) \
            if cfg.buckets else None
        self._block_index, self._block = -1, None
        # bucket key -> [(item, caption, key, ref)], in arrival order (dicts keep insertion order)
        self.buckets: dict[tuple, list] = {}
        # bucket key -> the batch tensors its items are views of ((latents, vision) for feature
        # shards, (pixels,) for images): samples are written into their slot as they are decoded
        self.batches_filling: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.pool = BatchPool() if release_flags is None else SharedBatchPool(release_flags)
        self._restore_pending(state.get("pending", []))

    # -- mixture ------------------------------------------------------------------------
    def _draw_image_only(self) -> bool:
        block, i = divmod(self.draws, _DRAW_BLOCK)
        if block != self._block_index:
            self._block = np.random.default_rng([self.seed, 3, self.slot, block]).random(_DRAW_BLOCK)
            self._block_index = block
        self.draws += 1
        return bool(self._block[i] < self.lam)

    # -- decoding -----------------------------------------------------------------------
    def _decode(self, sample: dict, image_only: bool):
        """-> (bucket key, item, caption); raises BadSample. The first failing check wins:
        missing member, caption (paired only), payload."""
        if self.cfg.features:
            if LATENTS not in sample or VISION not in sample:
                raise BadSample("missing_image", f"feature sample lacks {LATENTS} / {VISION}")
            caption = None if image_only else caption_of(sample)
            lat, vis = feature_arrays(sample, self.resolution, self.feature_spec)
            bkey = (lat.shape, vis.shape, lat.dtype, vis.dtype)
            # Straight into the sample's slot of the batch being filled (pread from a local
            # shard), checked finite while still in cache (a rejected sample's slot is reused
            # by the next one).
            lat_slot, vis_slot = self._slot(bkey, lat, vis)
            lat.into(lat_slot, check=True)
            vis.into(vis_slot, check=True)
            return bkey, (lat_slot, vis_slot), caption
        _, data = image_member(sample)
        caption = None if image_only else caption_of(sample)
        # resampled straight into the sample's slot of its bucket's batch (a rejected sample's
        # slot is reused by the next one)
        chw = decode_image_chw(data, self.resolution, buckets=self.buckets_px,
                               min_size_fraction=self.cfg.min_size_fraction, min_image_size=self.cfg.min_image_size,
                               max_image_pixels=self.cfg.max_image_pixels, resize_filter=self.cfg.resize_filter,
                               slot_for=self._pixel_slot)
        return tuple(chw.shape), chw, caption

    def _slot(self, bkey: tuple, lat, vis) -> tuple[torch.Tensor, torch.Tensor]:
        """The next free slot of bucket `bkey`'s feature batch (allocated when the bucket opens)."""
        batch = self.batches_filling.get(bkey)
        if batch is None:
            batch = self.batches_filling[bkey] = (self.pool.take((self.batch_size, *lat.shape), lat.dtype),
                                                  self.pool.take((self.batch_size, *vis.shape), vis.dtype))
        i = len(self.buckets.get(bkey, ()))
        return batch[0][i], batch[1][i]

    def _pixel_slot(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The next free slot ([3, H, W] uint8, channels-last) of the pixel batch of bucket
        `shape` (allocated when the bucket opens)."""
        batch = self.batches_filling.get(shape)
        if batch is None:
            batch = self.batches_filling[shape] = (self.pool.take((self.batch_size, *shape), torch.uint8,
                                                                  channels_last=True),)
        return batch[0][len(self.buckets.get(shape, ()))]

    def _restore_pending(self, refs: list) -> None:
        """Refill partially filled buckets from their references (re-read, not re-counted)."""
        chunks: dict[tuple, list] = {}
        for ref in refs:
            sid, epoch, chunk, loc, offset, image_only = ref
            ck = (sid, epoch, chunk, tuple(loc))
            if ck not in chunks:
                chunks[ck] = self.streams[sid].read_chunk(epoch, chunk, tuple(loc))
            sample = chunks[ck][offset]
            bkey, item, caption = self._decode(sample, image_only)  # decoded fine before the save
            self.buckets.setdefault(bkey, []).append((item, caption, sample["__key__"], list(ref)))

    # -- batches ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"streams": {str(sid): s.state() for sid, s in self.streams.items()}, "draws": self.draws,
                "batches": self.batches, "done": self.done, "exhausted": sorted(self.exhausted),
                "pending": [e[3] for bucket in self.buckets.values() for e in bucket],
                "stats": self.counter.snapshot()}

    def _emit(self, entries: Optional[list], bkey: Optional[tuple] = None) -> dict:
        batch, slots = None, {}
        if entries is not None:
            self.batches += 1
            # already assembled, sample by sample, in _decode
            tensors = self.batches_filling.pop(bkey)
            n = len(entries)
            if n < len(tensors[0]):  # the last, partial batch of a finite stream
                for t in tensors:
                    self.pool.give_back(t)
                tensors = tuple(_alloc((n, *t.shape[1:]), t.dtype, channels_last=not self.cfg.features).copy_(t[:n])
                                for t in tensors)
            # pixels: uint8, channels-last: a quarter of float32's bytes to fill, share and copy to
            # the device; the model converts to contiguous [-1, 1] float there (preprocess.unit_pixels)
            batch = dict(zip(("latents", "vision_features") if self.cfg.features else ("pixels",), tensors))
            for name, t in list(batch.items()):
                ref = self.pool.sent(t)
                if ref is not None:
                    slot, generation, known = ref
                    slots[name] = (slot, generation)
                    if known:  # the main process maps this buffer already: send its layout, not the tensor
                        batch[name] = PooledTensor(tuple(t.shape), t.stride(), t.dtype)
            batch["captions"] = [e[1] for e in entries]
            batch["keys"] = [e[2] for e in entries]
        return {"worker": self.logical, "batch": batch, "state": self.state(), "slots": slots}

    def __iter__(self) -> Iterator[dict]:
        if self.done and not self.buckets:  # finished before the save
            return
        while not self.done:
            image_only = self._draw_image_only()
            sid = IMAGE if (image_only and IMAGE in self.streams) or PAIRED not in self.streams else PAIRED
            if sid in self.exhausted:  # that stream is through: the other one serves the draw
                sid = PAIRED if sid == IMAGE else IMAGE
                image_only = image_only or sid == IMAGE  # image-only shards carry no caption
            stream = self.streams[sid]
            try:
                sample = next(stream)
            except StopIteration:
                self.exhausted.add(sid)
                if self.exhausted >= set(self.streams):
                    self.done = True
                    break
                continue
            ref = stream.ref(stream.offset - 1) + [image_only]
            try:
                bkey, item, caption = self._decode(sample, image_only)
            except BadSample as bad:
                self._bad(bad.reason, sample, bad.detail)
                continue
            except Exception as exn:  # a decoder bug on odd input must not kill the run
                self._bad("decode_error", sample, f"{type(exn).__name__}: {exn}")
                continue
            self.counter.good()
            bucket = self.buckets.setdefault(bkey, [])
            bucket.append((item, caption, sample["__key__"], ref))
            if len(bucket) == self.batch_size:
                del self.buckets[bkey]
                yield self._emit(bucket, bkey)
        # A finite stream ended (possibly before a save, in the middle of this flush): the
        # partial batches, then a marker carrying the final state.
        while self.buckets:
            bkey = next(iter(self.buckets))
            bucket = self.buckets.pop(bkey)
            if not self.cfg.drop_last:
                yield self._emit(bucket, bkey)
            for t in self.batches_filling.pop(bkey, ()):
                self.pool.give_back(t)
        yield self._emit(None)

    def _bad(self, reason: str, sample: dict, detail: str) -> None:
        self.counter.bad_sample(reason, sample.get("__url__", "?"), sample.get("__key__", "?"), detail)
        # Safety net for a worker stuck in a bad stretch (the main process checks the rank total).
        check_budget(merge_stats([self.counter.snapshot()]), self.cfg.error_budget,
                     self.cfg.min_samples_before_budget, self.where)


class _WorkerDataset(IterableDataset):
    """What the DataLoader workers run: physical worker p plays logical worker
    (p + rotation) % n, so a resumed loader continues the round-robin where it stopped."""

    def __init__(self, loader: "WebDatasetLoader", rotation: int):
        self.args = (loader.cfg, loader.urls, loader.resolution, loader.batch_size, loader.feature_spec)
        self.rank, self.world_size, self.seed = loader.rank, loader.world_size, loader.seed
        self.n = loader.slots_per_rank
        self.states = dict(loader._states)
        self.rotation = rotation
        self.release_flags = loader._release_flags  # [workers, slots] in shared memory (None in-process)

    def __iter__(self):
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotation) % self.n
        flags = None if self.release_flags is None or info is None else self.release_flags[logical]
        yield from _Worker(*self.args, rank=self.rank, workers=self.n, world_size=self.world_size, seed=self.seed,
                           logical=logical, state=self.states.get(logical), release_flags=flags)


def _alloc(shape, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """A batch tensor; in a DataLoader worker it is created in shared memory, so handing it
    to the main process copies nothing. (Conversion happens here, in the single-threaded
    worker, so the trainer's process does no per-batch work.) `channels_last`: a [B, C, H, W]
    tensor with channels-last strides (the decoded images' layout: one memcpy per sample)."""
    shape = tuple(shape)
    if channels_last:
        b, c, h, w = shape
        stride = (h * w * c, 1, w * c, c)
    else:
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    if get_worker_info() is None:
        return torch.empty_strided(shape, stride, dtype=dtype)
    # Straight into shared memory (as DataLoader's default collate): empty().share_memory_()
    # would fault in private pages and copy them first.
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, stride)


def _storage_users(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _alone_users() -> int:
    """What _storage_users says of a tensor that is its storage's only user (the storage
    object made to ask counts too)."""
    if not hasattr(torch._C, "_storage_Use_Count"):
        return -1  # never matches: buffers are not recycled
    base = torch.empty(0, dtype=torch.uint8).set_(torch.empty(1, dtype=torch.uint8).untyped_storage())
    return _storage_users(base)


_ALONE = _alone_users()


class BatchPool:
    """Batch tensors recycled once nobody holds them any more (in the loading process only).

    A fresh 13 MB batch is ~3,000 newly mapped pages: first-touching them cost 0.25-0.35 ms per
    feature sample on the development VM, as much as copying the sample itself. The pool keeps
    a private base tensor per buffer and hands out a view of it, so every batch, slice or numpy
    array of it that is alive anywhere adds a user to the storage; a buffer is handed out
    again only when the base is its storage's one user, so reuse never overwrites data
    someone still reads. DataLoader workers allocate in shared memory instead (the receiving
    process owns those), as does a torch without the use-count hook."""

    def __init__(self, per_shape: int = 4):
        self.per_shape = per_shape
        self.buffers: dict[tuple, list[tuple[torch.Tensor, int]]] = {}  # key -> [(base, its lone use count)]
        self.enabled = get_worker_info() is None and hasattr(torch._C, "_storage_Use_Count")

    def take(self, shape, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
        if not self.enabled:
            return _alloc(shape, dtype, channels_last)
        key = (tuple(shape), dtype, channels_last)
        pooled = self.buffers.setdefault(key, [])
        for base, alone in pooled:
            if _storage_users(base) == alone:
                return base[:]
        base = _alloc(shape, dtype, channels_last)
        if len(pooled) < self.per_shape:
            pooled.append((base, _storage_users(base)))
            return base[:]
        return base

    def sent(self, tensor: torch.Tensor) -> None:
        """SharedBatchPool's hook; in-process, the use counts alone say when a buffer is free."""

    def give_back(self, tensor: torch.Tensor) -> None:
        """SharedBatchPool's hook; nothing to do in-process (see sent)."""


class PooledTensor(NamedTuple):
    """What a worker sends instead of a batch tensor in a buffer the main process maps
    already: its layout (passing a tensor between processes costs a file-descriptor handoff
    through a socket, a few syscalls and thread switches on both sides)."""
    shape: tuple
    stride: tuple
    dtype: torch.dtype


class SharedBatchPool:
    """A DataLoader worker's batch buffers, in shared memory, recycled across the process
    boundary. A fresh shared-memory batch costs its page faults and zeroing in the worker
    (16 IOMM-B feature samples: ~8 ms, 0.5 ms per sample, twice the rest of the worker's
    work). The main process keeps every buffer it received mapped, and a buffer sent again
    travels as its layout only (PooledTensor), so a recycled one costs nothing there either.

    The protocol, per worker, one byte per buffer ("slot") in `release_flags`, a shared
    tensor the main process made: the worker sets it to 1 when it sends a batch in that
    buffer; the main process (WebDatasetLoader._release) sets it back to 0 once nothing but
    its own bookkeeping refers to the buffer (the storage's use count, as BatchPool); only
    then does the worker fill the buffer again. Nothing ever waits: with every buffer still
    out (a consumer keeping batches) the worker allocates a fresh one, as without the pool,
    and a full pool replaces a free buffer of another shape (aspect buckets)."""

    def __init__(self, release_flags: torch.Tensor):
        self.flags = release_flags.numpy()  # this worker's row
        self.buffers: dict[int, tuple[tuple, torch.Tensor]] = {}  # slot -> (key, base)
        self.slot_of: dict[int, int] = {}  # storage address -> slot
        self.filling: set[int] = set()  # handed out by take(), not yet sent or given back
        self.generation: dict[int, int] = {}  # slot -> how many buffers it has held
        self.announced: set[tuple[int, int]] = set()  # (slot, generation) sent as a tensor once

    def take(self, shape, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
        key = (tuple(shape), dtype, channels_last)
        free = [slot for slot in self.buffers if slot not in self.filling and self.flags[slot] == 0]
        slot = next((slot for slot in free if self.buffers[slot][0] == key), None)
        if slot is None:
            if len(self.buffers) < len(self.flags):
                slot = next(i for i in range(len(self.flags)) if i not in self.buffers)
            elif free:  # full: replace a free buffer of another shape
                slot = free[0]
                del self.slot_of[self.buffers.pop(slot)[1].untyped_storage().data_ptr()]
            else:  # every buffer is out or being filled
                return _alloc(shape, dtype, channels_last)
            base = _alloc(shape, dtype, channels_last)
            self.buffers[slot] = (key, base)
            self.slot_of[base.untyped_storage().data_ptr()] = slot
            self.generation[slot] = self.generation.get(slot, -1) + 1
        self.filling.add(slot)
        return self.buffers[slot][1][:]

    def sent(self, tensor: torch.Tensor) -> Optional[tuple[int, int, bool]]:
        """(slot, generation, whether the main process has this buffer already) of `tensor`'s
        buffer, now out; None: not a pooled buffer."""
        slot = self.slot_of.get(tensor.untyped_storage().data_ptr())
        if slot is None:
            return None
        self.flags[slot] = 1
        self.filling.discard(slot)
        ref = (slot, self.generation[slot])
        known = ref in self.announced
        self.announced.add(ref)
        return slot, ref[1], known

    def give_back(self, tensor: torch.Tensor) -> None:
        """A taken buffer that is not sent (a partial batch copied out, a dropped bucket)."""
        slot = self.slot_of.get(tensor.untyped_storage().data_ptr())
        if slot is not None:
            self.filling.discard(slot)


def _identity(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)  # decoding is per-sample; intra-op threads only oversubscribe


class WebDatasetLoader:
    """Iterator of batches with exact resume; see the module docstring for the guarantee.
    `iter(loader)` is the loader itself, so the stream continues across `for` loops."""

    def __init__(self, cfg: WebDatasetConfig, resolution: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, feature_spec: Optional[FeatureSpec] = None):
        problems = cfg.validate() or cfg.missing_shards()
        if resolution < 1 or batch_size < 1:
            problems.append(("resolution/batch_size", f"must be >= 1, got {resolution} / {batch_size}"))
        if seed < 0:
            problems.append(("seed", f"must be >= 0 (it seeds numpy's SeedSequence), got {seed}"))
        if not 0 <= rank < world_size:
            problems.append(("rank", f"must be in [0, world_size={world_size}), got {rank}"))
        if problems:
            raise ValueError("invalid data.webdataset config:\n" +
                             "\n".join(f"  data.webdataset.{k}: {m}" for k, m in problems))
        self.cfg, self.resolution, self.batch_size = cfg, resolution, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # feature shards: what the model takes (encoders, shapes); other samples count feature_mismatch
        self.feature_spec = feature_spec if cfg.features else None
        self.urls = {IMAGE: expand_shards(cfg.image_shards), PAIRED: expand_shards(cfg.paired_shards)}
        # part of every state_dict (per batch in precompute_features): hashed once, not per call
        # (8 ms for 100k shard names)
        names = "\n".join(self.urls[IMAGE] + ["--"] + self.urls[PAIRED])
        self._shards_digest = hashlib.sha1(names.encode()).hexdigest()
        self.slots_per_rank = max(1, cfg.num_workers)
        for sid, urls in self.urls.items():
            if urls and len(urls) < world_size * self.slots_per_rank and not cfg.resample:
                log.warning("%d %s shards for %d ranks x %d workers: every slot reads every shard and keeps its "
                            "share of samples (more I/O); write more, smaller shards", len(urls),
                            STREAM_NAMES[sid], world_size, self.slots_per_rank)
        self._states: dict[int, dict] = {}  # logical worker -> state carried by its latest batch
        self._next_worker = 0
        self._batches = 0
        self._it: Optional[Iterator[dict]] = None
        self._pin = cfg.pin_memory and torch.cuda.is_available()
        # SharedBatchPool's main-process side: release flags and, per (worker, slot), a tensor
        # on the buffer last received there (keeping it mapped) and whether it is out
        self._release_flags: Optional[torch.Tensor] = None
        self._received: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # -> (generation, tensor)
        self._out: set[tuple[int, int]] = set()

    # -- iteration ----------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = _generate(weakref.ref(self), self._source())
        return next(self._it)

    def _source(self) -> Iterator[dict]:
        self._received, self._out = {}, set()
        self._release_flags = None
        if self.cfg.num_workers > 0:
            # a worker's buffers: its prefetched batches + the one in use + one filling (shared
            # memory: /dev/shm holds up to that many batches per worker for the whole run)
            per_batch = 2 if self.cfg.features else 1  # latents + vision features, or pixels
            self._release_flags = torch.zeros(self.cfg.num_workers, per_batch * (self.cfg.prefetch_factor + 2),
                                              dtype=torch.uint8).share_memory_()
        dataset = _WorkerDataset(self, rotation=self._next_worker)
        if self.cfg.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                               prefetch_factor=self.cfg.prefetch_factor, collate_fn=_identity,
                               worker_init_fn=_worker_init, persistent_workers=False))

    def _release(self, out: dict) -> None:
        """Note the pooled buffers `out` arrived in (a tensor, received once per buffer, or the
        layout of a buffer received before: rebuilt on our mapping of it); hand back (flag 0)
        every buffer out that nothing refers to any more but our own tensor on it."""
        w = out["worker"]
        for name, (slot, generation) in out["slots"].items():
            value = out["batch"][name]
            if isinstance(value, PooledTensor):
                held_generation, held = self._received.get((w, slot), (None, None))
                if held_generation != generation:  # a worker / loader bug, never data to guess at
                    raise RuntimeError(f"data worker {w} sent buffer {slot}.{generation} by layout, but it was never "
                                       f"received (held: {held_generation})")
                out["batch"][name] = torch.empty(0, dtype=value.dtype).set_(held.untyped_storage(), 0, value.shape,
                                                                            value.stride)
            else:
                self._received[(w, slot)] = (generation, torch.empty(0, dtype=torch.uint8).set_(value.untyped_storage()))
            self._out.add((w, slot))
        for key in [k for k in self._out if _storage_users(self._received[k][1]) == _ALONE]:
            self._release_flags[key] = 0
            self._out.discard(key)

    def _consume(self, out: dict) -> Optional[dict]:
        w = out["worker"]
        if self._release_flags is not None:
            self._release(out)
        self._states[w] = out["state"]
        self._next_worker = (w + 1) % self.slots_per_rank
        if out["batch"] is None:  # end-of-stream marker: state only
            return None
        self._batches += 1
        check_budget(self.stats(), self.cfg.error_budget, self.cfg.min_samples_before_budget, f"on rank {self.rank}")
        return self._finish(out["batch"])

    def _finish(self, batch: dict) -> dict:
        if self._pin:
            for k in ("pixels", "latents", "vision_features"):
                if k in batch:
                    batch[k] = batch[k].pin_memory()
        return batch

    def close(self) -> None:
        """Stop the worker processes (the state is kept; iterating again resumes)."""
        if self._it is not None:
            self._it.close()
            self._it = None
        self._received, self._out = {}, set()

    # -- state --------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"rank": self.rank, "world_size": self.world_size, "num_workers": c.num_workers, "seed": self.seed,
                "batch_size": self.batch_size, "resolution": self.resolution, "shards": self._shards_digest,
                "options": [c.image_only_fraction, c.features, c.shuffle_buffer, c.epochs, c.resample, c.drop_last,
                            list(c.buckets), c.bucket_multiple, c.min_size_fraction, c.min_image_size,
                            c.max_image_pixels, c.resize_filter]}

    def state_dict(self) -> dict:
        """JSON-serialisable position of the stream after the last batch yielded."""
        return {"version": 1, "fingerprint": self._fingerprint(), "next_worker": self._next_worker,
                "batches": self._batches, "workers": {str(w): s for w, s in self._states.items()}}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        if "workers" not in state:  # e.g. the built-in demo source's {"epoch", "position"}
            raise ValueError("the saved data position is not a webdataset stream's (data.source changed?): "
                             "resume with the source that wrote it, or start over (train.resume=never)")
        self.close()
        mine, saved = self._fingerprint(), state.get("fingerprint", {})
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if not changed:
            self._states = {int(w): s for w, s in state["workers"].items()}
            self._next_worker, self._batches = int(state["next_worker"]), int(state["batches"])
            return
        if strict:
            raise ValueError("cannot resume the data stream exactly, the setup changed: " + "; ".join(changed) +
                             ". Set train.resume_data_exact=false to restart the stream at the saved epoch instead (from "
                             "Python: load_state_dict(state, strict=False)), or restore the saved setup.")
        # Not exact: every worker restarts at the oldest saved epoch of each stream; counters are kept.
        log.warning("data stream resumed inexactly (%s): restarting at the saved epoch", "; ".join(changed))
        epochs = {sid: min((w["streams"][sid]["epoch"] for w in state["workers"].values() if sid in w["streams"]),
                           default=0) for sid in ("0", "1")}
        merged = merge_stats([w["stats"] for w in state["workers"].values() if w.get("stats")])
        finished = all(w.get("done") for w in state["workers"].values())  # the saved run had read everything
        self._states = {w: {"streams": {sid: {"epoch": e} for sid, e in epochs.items()}, "done": finished,
                            "stats": {"ok": merged["ok"], "reasons": merged["reasons"]} if w == 0 else None}
                        for w in range(self.slots_per_rank)}
        self._next_worker, self._batches = 0, int(state.get("batches", 0))

    def stats(self) -> dict:
        """Rank-local counters: totals (seen / ok / bad / shard_errors / bad_fraction), per-reason
        counts, the worst shards, batches yielded and the epoch each stream is in (the oldest
        over workers). Sum "seen", "ok", "bad" and the reasons over ranks for global figures."""
        out = merge_stats([s["stats"] for s in self._states.values() if s.get("stats")])
        out["batches"] = self._batches
        out["epochs"] = {STREAM_NAMES[int(sid)]: min(s["streams"][sid]["epoch"] for s in self._states.values())
                         for sid in ("0", "1") if self._states and all(sid in s["streams"] for s in self._states.values())}
        return out

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _generate(loader_ref, source: Iterator[dict]) -> Iterator[dict]:
    # Holds the loader only weakly: a dropped loader is freed at once (no reference cycle
    # waiting for the garbage collector), which stops its worker processes.
    try:
        for out in source:
            loader = loader_ref()
            if loader is None:
                return
            batch = loader._consume(out)
            del loader
            if batch is not None:
                yield batch
            out = batch = None  # the consumer's alone now: its buffers can be released (SharedBatchPool)
    finally:
        # Stop the workers now, also when an error propagates: its traceback would keep the
        # DataLoader iterator alive until a garbage collection, which then waits on them.
        shutdown = getattr(source, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def build_webdataset_loader(cfg: WebDatasetConfig, resolution: int, batch_size: int, rank: int, world_size: int,
                            seed: int, feature_spec: Optional[FeatureSpec] = None) -> WebDatasetLoader:
    """The trainer's entry point (see WebDatasetLoader and the module docstring)."""
    return WebDatasetLoader(cfg, resolution, batch_size, rank, world_size, seed, feature_spec)


__all__ = ["WebDatasetLoader", "build_webdataset_loader", "DataErrorBudgetExceeded"]
