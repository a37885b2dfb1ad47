"""Writing image shards (the library side of tools/make_shards.py).

Inputs: a folder of images with optional sidecars (`name.txt` caption, `name.json`
metadata whose "caption" / "text" / "prompt" field also counts as the caption), or a JSONL
manifest with one {"image": path, "caption": ..., "key": ..., ...} per line. Every image
is checked the way the training reader would (so bad files are rejected once, here, not
every epoch), optionally downscaled, and written with webdataset's ShardWriter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import webdataset as wds
from PIL import Image, ImageOps, UnidentifiedImageError

from .preprocess import CAPTION_JSON_FIELDS, IMAGE_EXTS, failure_reason, looks_truncated, to_rgb

_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "PPM": "ppm"}


@dataclass
class ShardSummary:
    written: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    resumed: object = None  # a resumed pass: {"shard", "entry"} where it went on, or "complete"

    def counts(self) -> dict:
        """What a progress file keeps (the fields but `resumed`, copied)."""
        return {"written": self.written, "shards": list(self.shards), "bytes": self.bytes,
                "rejected": dict(self.rejected)}

    def format(self) -> str:
        lines = [f"written: {self.written} samples in {len(self.shards)} shards ({self.bytes / 1e6:.1f} MB)"]
        if self.resumed == "complete":
            lines.insert(0, "already complete (its progress file), nothing redone")
        elif self.resumed:
            lines.insert(0, f"resumed at shard {self.resumed['shard']} (entry {self.resumed['entry']})")
        if self.shards:
            lines.append(f"shards:  {brace_pattern(self.shards)}")
        total = sum(self.rejected.values())
        lines.append(f"rejected: {total}" + "".join(f"\n  {r}: {n}" for r, n in sorted(self.rejected.items())))
        return "\n".join(lines)


PARTIAL = ".partial"


WRITE_BUFFER = 1 << 20


def _open_shard_file(fname: str):
    # Written in 1 MB pieces: the page cache then holds the shard in large folios, out of which
    # a loader on the same machine reads feature arrays ~1.15x faster than out of the 4 kB pages
    # that tarfile's unaligned 10 kB writes leave (benchmarks/RESULTS.md, sixteenth session).
    return open(fname, "wb", buffering=WRITE_BUFFER)


class _AtomicShardWriter(wds.ShardWriter):
    """Each shard goes to `<name>.partial`, is flushed, synced and closed, and only then renamed
    by `post`. Leaving its `with` block on an exception closes the current shard without
    renaming it: it stays `<name>.partial` (ShardWriter's close would run `post` and give a
    half-filled shard its final name)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, opener=_open_shard_file, **kw)

    def finish(self):
        if self.tarstream is not None:
            self.tarstream.close()  # the tar's end marker; the file is ours to close (opener)
            file = self.tarstream.stream
            file.flush()
            if callable(self.post):  # a renamed shard is a complete one, on disk too
                os.fsync(file.fileno())
            file.close()
            if callable(self.post):
                self.post(self.fname)
            self.tarstream = None

    def __exit__(self, exc_type, *rest):
        if exc_type is not None:
            self.post = None
        self.close()


def shard_writer(out_pattern: str, max_count: int, max_size_mb: float, start_shard: int = 0,
                 on_shard: Optional[Callable[[str], None]] = None) -> wds.ShardWriter:
    """webdataset's ShardWriter, atomic per shard: each shard is written as `<name>.partial`
    and renamed when complete, so a reader (or a run started meanwhile) never sees a
    half-written shard, and a crash leaves only a `.partial` file (use it as a context
    manager). `final_name(sink.fname)` is the name the current shard will have. Shards are
    numbered from `start_shard`; `on_shard(path)` is called after each one got its name."""

    def post(fname: str) -> None:
        os.replace(fname, final_name(fname))
        if on_shard is not None:
            on_shard(final_name(fname))

    return _AtomicShardWriter(out_pattern + PARTIAL, maxcount=max_count, maxsize=max_size_mb * 1e6, verbose=0,
                              encoder=False, mtime=0, post=post, start_shard=start_shard)


def final_name(fname: str) -> str:
    return fname[: -len(PARTIAL)] if fname.endswith(PARTIAL) else fname


def read_progress(path: str, job: dict) -> Optional[dict]:
    """A pass's progress file (None when there is none); ValueError when it records a job with
    other arguments than `job` (JSON-normalised), naming them."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if saved.get("job") != job:
        was = saved.get("job") or {}
        changed = [f"{k}: {was.get(k)!r} -> {v!r}" for k, v in job.items() if was.get(k) != v]
        raise ValueError(f"progress file {path} records a pass with other arguments ({'; '.join(changed)}): give "
                         f"another output prefix, or delete it and the shards it lists to start over")
    return saved


def write_progress(path: str, record: dict) -> None:
    """`record` as JSON at `path`, atomically (a stop mid-write leaves the previous one)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def brace_pattern(paths: list[str]) -> str:
    """['d/img-000000.tar', ..., 'd/img-000009.tar'] -> 'd/img-{000000..000009}.tar' (for configs)."""
    m0, m1 = re.search(r"(\d+)(\D*)$", paths[0]), re.search(r"(\d+)(\D*)$", paths[-1])
    if len(paths) == 1 or not m0 or not m1:
        return paths[0] if len(paths) == 1 else "::".join(paths)
    return f"{paths[0][:m0.start(1)]}{{{m0.group(1)}..{m1.group(1)}}}{m0.group(2)}"


def _key_for(rel: str) -> str:
    stem = os.path.splitext(rel)[0].replace(os.sep, "/")
    return stem.replace(".", "_")  # webdataset splits the key at the first dot


def _caption_from_meta(meta: dict) -> Optional[str]:
    for k in CAPTION_JSON_FIELDS:
        if isinstance(meta.get(k), str):
            return meta[k]
    return None


def scan_folder(root: str) -> Iterator[dict]:
    """Entries {"path", "key", "caption", "meta"} for the images under `root` (sorted), with
    their sidecar `.txt` / `.json` files."""
    exts = {"." + e for e in IMAGE_EXTS}
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in exts:
                continue
            path = os.path.join(dirpath, name)
            caption, meta = None, None
            if os.path.exists(os.path.join(dirpath, stem + ".txt")):
                with open(os.path.join(dirpath, stem + ".txt"), encoding="utf-8", errors="replace") as f:
                    caption = f.read()
            if os.path.exists(os.path.join(dirpath, stem + ".json")):
                try:
                    with open(os.path.join(dirpath, stem + ".json"), encoding="utf-8") as f:
                        meta = json.load(f)
                except ValueError:
                    meta = {"_unparseable": True}
                if caption is None and isinstance(meta, dict):
                    caption = _caption_from_meta(meta)
            key = _key_for(os.path.relpath(path, root))
            while key in seen:  # a.jpg and a.png
                key += "_"
            seen.add(key)
            yield {"path": path, "key": key, "caption": caption, "meta": meta}


def scan_manifest(manifest: str) -> Iterator[dict]:
    """Entries from a JSONL manifest: "image" (path, relative to the manifest's folder),
    optional "caption" and "key"; other fields are kept as the sample's .json."""
    base = os.path.dirname(os.path.abspath(manifest))
    seen: set[str] = set()
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{manifest}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "image" not in row:
                raise ValueError(f"{manifest}:{lineno}: a line must be an object with an 'image' field")
            path = row.pop("image")
            path = path if os.path.isabs(path) else os.path.join(base, path)
            key = _key_for(str(row.pop("key", None) or os.path.relpath(path, base)))
            if key in seen:
                raise ValueError(f"{manifest}:{lineno}: duplicate key {key!r}")
            seen.add(key)
            caption = row.pop("caption", None)
            yield {"path": path, "key": key, "caption": caption, "meta": row or None}


def _prepare(job: tuple) -> tuple[str, object]:
    """One entry -> ("ok", record) or (reason, detail). Runs in a worker process."""
    entry, opts = job
    try:
        with open(entry["path"], "rb") as f:
            data = f.read()
    except OSError as exn:
        return "unreadable_file", str(exn)
    if not data:
        return "empty_payload", ""
    caption = entry.get("caption")
    if opts["require_caption"]:
        if caption is None:
            return "missing_caption", ""
        if not str(caption).strip():
            return "empty_caption", ""
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as exn:
        return failure_reason(data, exn), str(exn)
    fmt, (w, h) = im.format, im.size
    if min(w, h) < opts["min_size"]:
        return "too_small", f"{w}x{h}"
    try:
        if opts["verify"]:
            im.load()  # full decode: catches truncated files once, here
    except Exception as exn:
        return ("truncated_image" if "truncated" in str(exn) or looks_truncated(data) else "decode_error"), str(exn)
    ext = _FORMAT_EXT.get(fmt)
    max_side = opts["max_side"]
    if ext is None or (max_side and max(w, h) > max_side):
        # Re-encode: unknown container, or shrink so shards stay small (orientation baked in).
        try:  # decodes the image: without --verify this is where a damaged file shows
            im = ImageOps.exif_transpose(im)
            if max_side and max(im.size) > max_side:
                s = max_side / max(im.size)
                im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            to_rgb(im).save(buf, "JPEG", quality=opts["quality"])
        except Exception as exn:  # noqa: BLE001 - PIL raises many kinds for a damaged file
            return ("truncated_image" if "truncated" in str(exn) or looks_truncated(data) else "decode_error"), str(exn)
        data, ext = buf.getvalue(), "jpg"
    record = {"__key__": entry["key"], ext: data}
    if caption is not None:
        record["txt"] = str(caption).encode("utf-8")
    if entry.get("meta") is not None:
        record["json"] = json.dumps(entry["meta"]).encode("utf-8")
    return "ok", record


def make_shards(entries: Iterable[dict], out_pattern: str, *, max_count: int = 10_000, max_size_mb: float = 1000.0,
                min_size: int = 0, require_caption: bool = False, verify: bool = True, shuffle: bool = True,
                seed: int = 0, max_side: Optional[int] = None, quality: int = 95, workers: int = 1,
                progress: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> ShardSummary:
    """Check and write `entries` (from scan_folder / scan_manifest) to shards named
    `out_pattern % i` (e.g. "out/img-%06d.tar"), at most `max_count` samples and about
    `max_size_mb` MB each. `shuffle` permutes the samples with `seed` first, so each shard
    is a random slice (the loader's shuffle buffer then only mixes within a chunk).

    `progress`: a JSON file rewritten (atomically) each time a shard got its final name, with
    the entry that opened the next shard and the counts so far. Started again with the same
    entries and arguments after a stop anywhere, the pass goes on from there (the shard in
    progress is written again) and ends with an uninterrupted pass's shards, byte for byte, and
    its counts; a finished pass is not redone (`summary.resumed` says which). Other entries or
    arguments are refused (ValueError naming them). `log(line)`: one line per finished shard
    (samples so far, this pass's samples/s), for long passes."""
    entries = list(entries)
    if shuffle:
        entries = [entries[i] for i in np.random.default_rng(seed).permutation(len(entries))]
    opts = {"require_caption": require_caption, "min_size": min_size, "verify": verify, "max_side": max_side,
            "quality": quality}
    os.makedirs(os.path.dirname(os.path.abspath(out_pattern % 0)), exist_ok=True)
    summary = ShardSummary()
    first, start_shard = 0, 0
    job = None
    if progress is not None:
        digest = hashlib.sha1()
        for e in entries:  # in writing order: the shuffle is part of the job
            digest.update(json.dumps(e, sort_keys=True, default=str).encode())
        job = json.loads(json.dumps({"out": out_pattern, "entries": len(entries), "entries_sha1": digest.hexdigest(),
                                     "max_count": max_count, "max_size_mb": max_size_mb, **opts}))
        saved = read_progress(progress, job)
        if saved is not None:
            summary = ShardSummary(**saved["summary"])
            if saved["done"]:
                summary.resumed = "complete"
                return summary
            first, start_shard = saved["next_entry"], saved["next_shard"]
            summary.resumed = {"shard": start_shard, "entry": first}
    now = {"entry": first, "closing": False}  # the entry being written; the writer's final close
    n_before, written_before, started = len(summary.shards), summary.written, time.perf_counter()

    def shard_done(path: str) -> None:
        if log is not None:
            rate = (summary.written - written_before) / max(time.perf_counter() - started, 1e-9)
            log(f"{os.path.basename(path)} done: {summary.written} samples so far, {rate:.1f} samples/s")
        if progress is None:
            return
        if now["closing"]:
            write_progress(progress, {"job": job, "summary": summary.counts(), "done": True})
        else:  # the entry being written opens the next shard (neither counted nor listed yet)
            write_progress(progress, {"job": job, "summary": summary.counts(), "done": False,
                                      "next_entry": now["entry"],
                                      "next_shard": start_shard + len(summary.shards) - n_before})
    jobs = ((e, opts) for e in entries[first:])
    # fork where there is one: workers only run PIL, and spawning would re-import torch in each
    pool = get_context("fork" if "fork" in get_all_start_methods() else "spawn").Pool(workers) if workers > 1 else None
    results = pool.imap(_prepare, jobs, chunksize=16) if pool else map(_prepare, jobs)
    sink, finished = None, False
    try:
        for index, (status, payload) in enumerate(results, start=first):
            if status != "ok":
                summary.rejected[status] = summary.rejected.get(status, 0) + 1
                continue
            if sink is None:  # opened lazily: no empty shard when everything is rejected
                sink = shard_writer(out_pattern, max_count, max_size_mb, start_shard, shard_done)
            now["entry"] = index
            sink.write(payload)
            if final_name(sink.fname) not in summary.shards:
                summary.shards.append(final_name(sink.fname))
            summary.written += 1
            summary.bytes += sum(len(v) for k, v in payload.items() if not k.startswith("__"))
        finished = True
        now["closing"] = True
    finally:
        if sink is not None:
            sink.__exit__(None if finished else RuntimeError, None, None)  # a crash keeps the shard .partial
        if pool is not None:
            pool.close()
            pool.join()
    if finished and sink is None and progress is not None:  # everything rejected: nothing to resume either
        write_progress(progress, {"job": job, "summary": summary.counts(), "done": True})
    return summary
