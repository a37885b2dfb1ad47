"""Shard lists and the resumable, shuffled raw-sample stream of one (rank, worker) slot.

Positions are exact: a location (shard position in the slot's list for the epoch, raw
sample index inside that shard, global raw index in the epoch) names the next sample to
read, so a stream can be re-opened at any chunk start by re-reading (not decoding) at
most one shard prefix. See stream.py for the guarantee this gives.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import os
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

log = logging.getLogger("iomm_scale.data")

Location = tuple[int, int, int]  # (shard position, raw index in shard, global raw index in epoch)
START: Location = (0, 0, 0)


def expand_shards(specs: list[str]) -> list[str]:
    """Shard specs -> URLs: brace patterns, '::'-joined lists and environment variables
    (webdataset's rules), in the given order."""
    urls: list[str] = []
    for spec in specs:
        urls.extend(expand_urls(spec))
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


class _TailReader:
    """Passes reads through and keeps the last few chunks, so the end of the archive can be
    checked: Python's tarfile treats a header cut off at the end of the file as a normal end."""

    def __init__(self, f):
        self.f, self.pos, self.chunks = f, 0, collections.deque(maxlen=4)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.chunks.append((self.pos, data))
        self.pos += len(data)
        return data

    def ends_with_marker(self, offset: int) -> bool:
        """Is there an all-zero 512-byte block (tar's end-of-archive marker) at `offset`?"""
        if not self.chunks or offset < self.chunks[0][0]:
            return False
        tail = b"".join(d for _, d in self.chunks)[offset - self.chunks[0][0]:][:512]
        return len(tail) == 512 and not any(tail)


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


class _Member:
    """What read_shard needs of a tarfile.TarInfo, for headers parsed by _ustar_members."""

    __slots__ = ("name", "offset_data", "size")

    def __init__(self, name: str, offset_data: int, size: int):
        self.name, self.offset_data, self.size = name, offset_data, size

    def isreg(self) -> bool:
        return True


_WINDOW_BLOCK = 4096  # holds a feature sample's first three headers, its .json and .npy header
_USTAR_MAGIC = (b"ustar\x0000", b"ustar  \x00")  # POSIX, GNU


class FileSpan:
    """A member's bytes left in its local shard file, read on demand with pread: `readinto`
    copies them straight from the page cache into a caller's buffer (a batch slot), one
    kernel copy. Copying out of a memory mapping instead costs the same copy plus a page
    fault per newly mapped page of the source (1.3-1.5x the time for a 0.9 MB feature sample
    on the development VM). `head`: the member's first bytes when they were read with its
    tar header (a .npy header is parsed from them without another read). The shard's file
    stays open while any span of it is alive."""

    __slots__ = ("file", "offset", "size", "head")

    def __init__(self, file, offset: int, size: int, head: bytes = b""):
        self.file, self.offset, self.size, self.head = file, offset, size, head

    def __len__(self) -> int:
        return self.size

    def read(self, start: int = 0, n: int = -1) -> bytes:
        """Bytes [start, start + n) of the member (to its end for n < 0)."""
        n = self.size - start if n < 0 else min(n, self.size - start)
        if start + n <= len(self.head):
            return self.head[start:start + n]
        data = os.pread(self.file.fileno(), n, self.offset + start)
        if len(data) != n:
            raise OSError(f"short read: the shard file shrank while being read ({len(data)} of {n} bytes)")
        return data

    def __bytes__(self) -> bytes:
        return self.read()

    def readinto(self, start: int, buffer) -> None:
        """Fill the writable, contiguous `buffer` with the member's bytes from `start` on."""
        view = memoryview(buffer).cast("B")
        if start + len(view) > self.size:
            raise ValueError(f"{len(view)} bytes from {start} run past the member's {self.size}")
        if hasattr(os, "preadv"):
            got = os.preadv(self.file.fileno(), [view], self.offset + start)
        else:  # e.g. older macOS: seek + read (one thread reads a shard's spans)
            self.file.seek(self.offset + start)
            got = self.file.readinto(view) or 0
        if got != len(view):
            raise OSError(f"short read: the shard file shrank while being read ({got} of {len(view)} bytes)")


class _Window:
    """A local shard's bytes read by pread in blocks of `block` bytes: a sample's tar headers,
    small members and .npy headers mostly come from one or two reads. (Parsed from a memory
    mapping instead, each newly touched page of a feature shard cost a page fault: 9.5 vs 4.9
    us for a feature sample's three headers on the development VM; a 4 kB read costs ~2 us less
    there than an 8 kB one.)"""

    def __init__(self, fd: int, size: int, block: int):
        self.fd, self.size, self.block = fd, size, block
        self.start, self.data = 0, b""

    def read(self, offset: int, n: int) -> bytes:
        """Bytes [offset, offset + n), fewer at the end of the file."""
        at = offset - self.start
        if 0 <= at and offset + n <= self.start + len(self.data):
            return self.data[at:at + n]
        if n > self.block:  # a large member: read on its own
            return os.pread(self.fd, n, offset)
        self.start, self.data = offset, os.pread(self.fd, self.block, offset)
        return self.data[:n]

    def cached(self, offset: int, n: int) -> bytes:
        """Whatever of [offset, offset + n) the last block holds from `offset` on (no read)."""
        at = offset - self.start
        return self.data[at:at + n] if 0 <= at < len(self.data) else b""


def _ustar_fields(hdr: bytes) -> Optional[tuple[bytes, int]]:
    """(name, size) of a plain ustar regular-file header with a valid checksum, else None (the
    C helper's ustar_header, when built, does the same 3x faster)."""
    magic = hdr[257:265]
    if len(hdr) < 512 or hdr[156:157] not in (b"0", b"\x00") or magic not in _USTAR_MAGIC:
        return None
    # chksum field counted as spaces; zero bytes (most of a header) add nothing and are
    # dropped first: summing 512 bytes one by one is most of a header's parse time
    if sum(hdr.translate(None, b"\x00")) - sum(hdr[148:156]) + 256 != _octal(hdr[148:156]):
        return None
    size = _octal(hdr[124:136])
    name = hdr[:100].split(b"\x00", 1)[0]
    if magic == _USTAR_MAGIC[0]:
        prefix = hdr[345:500].split(b"\x00", 1)[0]
        name = prefix + b"/" + name if prefix else name
    if size < 0 or not name or name.endswith(b"/"):
        return None
    return name, size


try:
    from ._native import ustar_header as _ustar_header
except ImportError:  # built without a C compiler
    _ustar_header = _ustar_fields


def _ustar_members(tar: tarfile.TarFile, window: _Window) -> Iterator[_Member]:
    """Regular-file members parsed straight from the shard's bytes, from `tar.offset` on,
    advancing `tar.offset` past each one. tarfile builds a TarInfo through ~30 Python calls per
    header (0.06 ms; a feature sample has 3 members). Stops, leaving `tar.offset` at the
    header, at anything but a plain ustar regular file with a valid checksum (end-of-archive
    zeros, pax / GNU long-name headers, links, a cut or corrupt header, numbers in other than
    plain octal): tarfile.next() then goes on from there, so its rules and errors stay the
    only ones."""
    while tar.offset + 512 <= window.size:
        fields = _ustar_header(window.read(tar.offset, 512))
        if fields is None:
            return
        offset_data = tar.offset + 512
        tar.offset = offset_data + -(-fields[1] // 512) * 512
        yield _Member(fields[0].decode(tar.encoding, tar.errors), offset_data, fields[1])


def _octal(field: bytes) -> int:
    """A tar number field; -1 when it is not plain octal (base-256 or garbage: tarfile decides)."""
    field = field.split(b"\x00", 1)[0].strip()
    try:
        return int(field or b"0", 8)
    except ValueError:
        return -1


def _open_tar(stream, views: tuple[str, ...] = ()) -> tuple[Iterator, Callable[[], bool],
                                                            Callable[[tarfile.TarInfo], bytes]]:
    """(members, at_end, read_member): at_end() says whether the end-of-archive marker follows
    the last member. Plain seekable files are read in random-access mode (one read call per
    member, skipped members not read at all); pipes, URLs and compressed shards as a stream.

    Plain local files are read with pread (_Window): their headers are parsed here
    (_ustar_members), and members whose suffix is in `views` are returned as FileSpans
    instead of bytes: feature arrays are then read straight from the page cache, once, into
    their batch slot (a read() into fresh bytes costs a second copy plus page faults on the
    new buffer)."""
    if getattr(stream, "seekable", lambda: False)():
        head = stream.read(6)
        stream.seek(0)
        if not head.startswith(_COMPRESSED):
            tar = tarfile.open(fileobj=stream, mode="r:")
            try:
                window = _Window(stream.fileno(), os.fstat(stream.fileno()).st_size, _WINDOW_BLOCK)
            except (OSError, AttributeError, io.UnsupportedOperation):  # not a real file
                window = None
            view_suffixes = tuple("." + v for v in views)
            span_file = None  # a second descriptor of the shard, shared by its spans (closed with the last)

            def at_end() -> bool:
                stream.seek(tar.offset)
                block = stream.read(512)
                return len(block) == 512 and not any(block)

            def read_member(info: tarfile.TarInfo):
                nonlocal span_file
                if window is None:
                    # extractfile().read() would go through 8 kB chunks: slow for MB-sized members
                    stream.seek(info.offset_data)
                    data = stream.read(info.size)
                else:
                    # a member reaching past the end of the file (a cut shard) is rejected here;
                    # spans only ever read, so a file that shrinks later gives them a short read
                    # (OSError)
                    if info.name.endswith(view_suffixes):
                        if info.offset_data + info.size > window.size:
                            raise tarfile.ReadError("unexpected end of data")
                        if span_file is None:
                            span_file = os.fdopen(os.dup(stream.fileno()), "rb", buffering=0)
                        return FileSpan(span_file, info.offset_data, info.size,
                                        head=window.cached(info.offset_data, min(info.size, 256)))
                    data = window.read(info.offset_data, info.size)
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                return data

            return _members(tar, window), at_end, read_member
    reader = _TailReader(stream)
    tar = tarfile.open(fileobj=reader, mode="r|*")
    return (_members(tar),
            lambda: (_compressed_complete(tar) if getattr(tar.fileobj, "comptype", "tar") != "tar"
                     else reader.ends_with_marker(tar.offset)),
            lambda info: tar.extractfile(info).read())


def _compressed_complete(tar: tarfile.TarFile) -> bool:
    """A compressed shard (.tar.gz / .bz2 / .xz) read to its end: the decompressor must reach
    its end-of-stream mark (a cut file ends without it, and tarfile would take the cut for the
    end of the archive, silently dropping the samples after it)."""
    stream = tar.fileobj
    # tarfile stopped at a whole (zero) block after the last member, the archive's end marker, not
    # at a short read (a tar cut before it was compressed)
    marker = stream.tell() >= tar.offset + tarfile.BLOCKSIZE
    try:
        while stream.read(1 << 16):
            pass
    except (EOFError, OSError, tarfile.TarError):
        return False
    return marker and bool(getattr(getattr(stream, "cmp", None), "eof", True))


def _members(tar: tarfile.TarFile, window: Optional[_Window] = None) -> Iterator:
    """The shard's members from tarfile; with a local shard's window, each run of plain headers
    after a tarfile member (the first one: tarfile read it to open the file) from _ustar_members."""
    while (info := tar.next()) is not None:
        tar.members = []  # tarfile keeps every TarInfo otherwise
        yield info
        if window is not None:
            yield from _ustar_members(tar, window)


def read_shard(url: str, skip: int = 0, views: tuple[str, ...] = ()) -> Iterator[dict]:
    """Raw samples {"__key__", "__url__", ext: bytes, ...} of one shard, in tar order
    (webdataset's layout: members "<key>.<ext>", consecutive per key), from sample `skip`
    on (the samples before are not read, only counted).

    Raises on a shard that cannot be opened or read to its end-of-archive marker, after
    yielding every sample known to be complete: when a member's data is cut off, the
    samples before that member's key are complete; when the cut is in a header, the sample
    in progress may lack members and is dropped. (webdataset's group_by_keys also drops the
    complete sample before a cut, and tarfile takes a cut header for the end: exact counting
    needs both handled here.)

    `views`: member extensions (e.g. "latents.npy") handed out as FileSpans (read on
    demand, straight into the caller's buffer) rather than bytes, for local uncompressed
    shards (see _open_tar)."""
    stream = gopen(url)
    current: Optional[dict] = None
    key, index = None, -1  # the key in progress and its sample index in the shard
    try:
        members, at_end, read_member = _open_tar(stream, tuple(views))
        for info in members:
            if not info.isreg():
                continue
            prefix, suffix = base_plus_ext(info.name)
            if prefix is None or (prefix.startswith("__") and prefix.endswith("__")):
                continue
            if prefix != key:
                key, index = prefix, index + 1
                if current is not None:
                    yield current
                    current = None
            if index < skip:
                continue
            data = read_member(info)  # cut off -> raises; `current` is dropped
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            suffix = suffix.lower()
            if suffix in current:
                raise ValueError(f"duplicate member {info.name}")
            current[suffix] = data
        if not at_end():
            raise tarfile.ReadError("no end-of-archive marker after the last member: the shard is truncated")
        if current is not None:
            yield current
    finally:
        stream.close()


@dataclass(frozen=True)
class SlotPlan:
    """Which shards slot `slot` of `num_slots` (= world_size x workers) reads in an epoch.

    - shard split (#shards >= #slots): every epoch a seeded permutation of all shards,
      dealt round-robin to the slots; a slot keeps every sample of its shards.
    - sample split (#shards < #slots): every slot reads the whole permutation and keeps the
      samples whose global index in the epoch is congruent to its slot.
    - resample: each slot draws ceil(#shards / #slots) shards with replacement per epoch.
    """

    urls: tuple[str, ...]
    stream_id: int
    seed: int
    slot: int
    num_slots: int
    resample: bool = False
    views: tuple[str, ...] = ()  # member extensions handed out as FileSpans (local shards)

    @property
    def sample_split(self) -> bool:
        return not self.resample and len(self.urls) < self.num_slots

    def epoch_urls(self, epoch: int) -> list[str]:
        n = len(self.urls)
        if self.resample:
            rng = np.random.default_rng([self.seed, self.stream_id, epoch, self.slot, 1])
            return [self.urls[i] for i in rng.integers(0, n, size=math.ceil(n / self.num_slots))]
        perm = np.random.default_rng([self.seed, self.stream_id, epoch]).permutation(n)
        order = [self.urls[i] for i in perm]
        return order if self.sample_split else order[self.slot :: self.num_slots]

    def owns(self, global_index: int) -> bool:
        return not self.sample_split or global_index % self.num_slots == self.slot


def iter_owned(plan: SlotPlan, epoch: int, loc: Location,
               on_shard_error: Optional[Callable[[str, Exception], None]]) -> Iterator[tuple[Location, dict]]:
    """(location after the sample, raw sample) for the samples this slot owns, from `loc`
    to the end of the epoch. A shard that fails to open or read is reported through
    `on_shard_error` (None = already counted) and the stream goes on with the next shard;
    the samples read before the failure stay in the stream, so re-reading is identical."""
    urls = plan.epoch_urls(epoch)
    pos, skip, gidx = loc
    while pos < len(urls):
        url = urls[pos]
        index = skip
        try:
            for sample in read_shard(url, skip, plan.views):  # a resume skips the consumed prefix unread
                index += 1
                gidx += 1
                if plan.owns(gidx - 1):
                    yield (pos, index, gidx), sample
        except Exception as exn:  # unreadable / truncated shard: counted, never fatal here
            # split by sample, every slot reads every shard: one slot per shard counts its error
            if on_shard_error is not None and (not plan.sample_split or pos % plan.num_slots == plan.slot):
                on_shard_error(url, exn)
        pos, skip = pos + 1, 0


class ChunkedShuffle:
    """The slot's stream for one source: epochs of owned samples, shuffled in consecutive
    chunks of `buffer` samples; chunk c of epoch e is permuted by rng(seed, stream, e, slot, c).

    State (JSON-friendly): {"epoch", "chunk", "loc" (where the chunk starts), "offset"
    (samples of the chunk already handed out), "done"}. Restoring it re-reads the chunk
    from `loc` (raw bytes only) and continues exactly where the saved stream was.
    """

    def __init__(self, plan: SlotPlan, buffer: int, epochs: Optional[int],
                 on_shard_error: Callable[[str, Exception], None], state: Optional[dict] = None):
        self.plan, self.buffer, self.epochs = plan, buffer, epochs
        self.on_shard_error = on_shard_error
        state = state or {}
        self.epoch = int(state.get("epoch", 0))
        self.chunk = int(state.get("chunk", 0))
        self.loc: Location = tuple(state.get("loc", START))  # type: ignore[assignment]
        self.offset = int(state.get("offset", 0))
        self.done = bool(state.get("done", False))
        self._items: Optional[list[dict]] = None
        self._next_loc: Location = self.loc
        self._restoring = state.get("chunk_filled", False)
        self._empty_epochs = 0
        self._empty_urls: set[str] = set()  # shards of the current streak of epochs without a sample
        self._reader: Optional[Iterator] = None  # the open shard reader, positioned at _reader_at
        self._reader_at: tuple = ()

    def state(self) -> dict:
        return {"epoch": self.epoch, "chunk": self.chunk, "loc": list(self.loc), "offset": self.offset,
                "done": self.done, "chunk_filled": self._items is not None}

    def ref(self, offset: int) -> list:
        """A reference to the sample handed out at `offset` of the current chunk."""
        return [self.plan.stream_id, self.epoch, self.chunk, list(self.loc), offset]

    def _read_chunk(self, epoch: int, chunk: int, loc: Location, count_errors: bool) -> tuple[list[dict], Location]:
        # Going forward, the open shard reader continues where the last chunk stopped; only a
        # restore re-opens a shard and skips its consumed prefix.
        if count_errors and self._reader is not None and self._reader_at == (epoch, loc):
            it = self._reader
        else:
            it = iter_owned(self.plan, epoch, loc, self.on_shard_error if count_errors else None)
        if self._reader is not None and self._reader is not it and count_errors:
            self._reader.close()
        items, end = [], loc
        for end, sample in it:
            items.append(sample)
            if len(items) == self.buffer:
                break
        if count_errors:
            self._reader, self._reader_at = it, (epoch, end)
        else:
            it.close()
        if len(items) > 1:
            rng = np.random.default_rng([self.plan.seed, self.plan.stream_id, epoch, self.plan.slot, chunk, 2])
            items = [items[i] for i in rng.permutation(len(items))]
        return items, end

    def read_chunk(self, epoch: int, chunk: int, loc: Location) -> list[dict]:
        """Re-read a chunk in its shuffled order, errors not re-counted (to refill the
        buckets of a resumed worker: `ref()` names a sample by chunk and offset)."""
        return self._read_chunk(epoch, chunk, tuple(loc), count_errors=False)[0]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while not self.done:
            if self._items is None:
                # A restored chunk was read (and its shard errors counted) before the save.
                self._items, self._next_loc = self._read_chunk(self.epoch, self.chunk, self.loc,
                                                               count_errors=not self._restoring)
                self._restoring = False
            if self.offset < len(self._items):
                sample = self._items[self.offset]
                self.offset += 1
                return sample
            if len(self._items) < self.buffer:  # short chunk: the epoch is over
                self._end_epoch(had_samples=self.chunk > 0 or len(self._items) > 0)
            else:
                self.chunk, self.loc, self.offset = self.chunk + 1, self._next_loc, 0
            self._items = None
        raise StopIteration

    def _end_epoch(self, had_samples: bool) -> None:
        if had_samples:
            self._empty_epochs, self._empty_urls = 0, set()
        else:
            self._empty_epochs += 1
            self._empty_urls.update(self.plan.epoch_urls(self.epoch))
        self.epoch, self.chunk, self.loc, self.offset = self.epoch + 1, 0, START, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            self.done = True
        # Looping over nothing would hang the trainer; but a slot dealt only the few bad shards of
        # a good set for a while is not that: stop once the streak has tried every shard.
        elif self.epochs is None and self._empty_epochs >= 3 and self._empty_urls >= set(self.plan.urls):
            from .errors import NoDataError

            raise NoDataError(f"slot {self.plan.slot} of {self.plan.num_slots} read no sample in 3 consecutive epochs of "
                              f"{len(self.plan.epoch_urls(self.epoch))} shard(s), e.g. {self.plan.urls[0]}: "
                              "all unreadable or empty, or fewer samples than ranks x workers")
