#!/usr/bin/env python
"""Images -> webdataset tar shards for iomm-scale.

    # a folder of images, with optional sidecars name.txt (caption) / name.json (metadata)
    python tools/make_shards.py --folder photos/ --out data/img --max-size-mb 1000
    # a JSONL manifest: {"image": "relative/or/absolute.jpg", "caption": "...", "key": "..."}
    python tools/make_shards.py --manifest pairs.jsonl --out data/pairs --max-count 5000 --require-caption

Writes data/img-000000.tar, data/img-000001.tar, ... and prints what was written and
what was rejected, per reason, plus the brace pattern to put in the config
(data.webdataset.image_shards / paired_shards). Every image is decoded once here, so
bad files are rejected before training, not every epoch.

Resumable: OUT.progress.json records, after each finished shard, where the pass stands. Run
the same command again after a stop anywhere and it goes on from the shard it was writing,
ending with an uninterrupted pass's shards (byte for byte) and counts; a finished pass is not
redone. Other inputs or options are refused (exit 2): use another --out, or delete the
progress file and its shards to start over.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from iomm_scale.data.preprocess import IMAGE_EXTS  # noqa: E402
from iomm_scale.data.writer import make_shards, scan_folder, scan_manifest  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="folder of images (searched recursively), sidecars name.txt / name.json")
    src.add_argument("--manifest", help="JSONL manifest, one {'image', 'caption', 'key', ...} per line")
    p.add_argument("--out", required=True, help="output prefix: OUT-000000.tar, OUT-000001.tar, ...")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most (default 10000)")
    p.add_argument("--max-size-mb", type=float, default=1000.0, help="shard size in MB at most (default 1000)")
    p.add_argument("--min-size", type=int, default=0, help="reject images whose shorter side is below this (px)")
    p.add_argument("--max-side", type=int, default=None,
                   help="re-encode (JPEG) images whose longer side exceeds this, downscaled to it")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")
    p.add_argument("--require-caption", action="store_true", help="reject samples without a non-empty caption")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="only read image headers (faster; truncated files then reach the training reader)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the input order")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default 0)")
    p.add_argument("--workers", type=int, default=1, help="processes checking / re-encoding images (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_count < 1 or args.max_size_mb <= 0:
        print("error: --max-count must be >= 1 and --max-size-mb > 0", file=sys.stderr)
        return 2
    source = args.folder or args.manifest
    if not (os.path.isdir(source) if args.folder else os.path.isfile(source)):
        print(f"error: {'--folder' if args.folder else '--manifest'} {source}: no such "
              f"{'directory' if args.folder else 'file'}", file=sys.stderr)
        return 2
    entries = scan_folder(args.folder) if args.folder else scan_manifest(args.manifest)
    if args.manifest:  # read whole first: a malformed line is named before any shard is written
        try:
            entries = list(entries)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        summary = make_shards(entries, args.out + "-%06d.tar", max_count=args.max_count, max_size_mb=args.max_size_mb,
                              min_size=args.min_size, require_caption=args.require_caption, verify=args.verify,
                              shuffle=args.shuffle, seed=args.seed, max_side=args.max_side, quality=args.quality,
                              workers=args.workers, progress=args.out + ".progress.json",
                              log=lambda line: print(line, flush=True))
    except ValueError as e:  # a progress file of another pass
        print(f"error: cannot resume: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    if not summary.written:
        print(f"error: nothing written from {source}" + ("" if summary.rejected else
              f" (no {'/'.join(IMAGE_EXTS)} files found)"), file=sys.stderr)
    return 0 if summary.written else 1


if __name__ == "__main__":
    sys.exit(main())
