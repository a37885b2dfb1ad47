#!/usr/bin/env python
"""Raw image shards -> feature shards (VAE latents + frozen vision features, before masking).

    python tools/precompute_features.py --config configs/b.yaml --out data/feat \
        [--set data.resolution=512 ...] [--device cuda] [--dtype float16] [--batch-size 64]
    # several processes / nodes: each takes its share of the shards
    torchrun --nproc_per_node 8 tools/precompute_features.py --config configs/b.yaml --out data/feat
    sbatch launchers/slurm/precompute.sbatch      # or srun: SLURM_PROCID / SLURM_NTASKS are the rank / world

Reads the run config's data.webdataset.image_shards and paired_shards (one pass each, no
shuffle, bad images skipped and counted), encodes every image with the config's frozen
VAE and vision tower at data.resolution, and writes OUT-image[-rRRR]-000000.tar ... and
OUT-paired[-rRRR]-000000.tar .... Train on them with data.webdataset.features: true and
the printed shard patterns; the MIM mask is still drawn per step, so one pass serves
every epoch. Features are tied to the model's VAE, vision tower and the resolution: each
sample's .json records them (`encoders`: digests of both), and training with another VAE or
vision tower is refused before the first step.

Resumable: after each finished shard OUT-image[-rRRR].progress.json records where the pass
stands. Run the same command again after a crash, kill or preemption and it goes on from the
shard it was writing (the shards come out as an uninterrupted pass's, byte for byte); a
finished pass is not redone. Other arguments, shards or batch size than the recorded ones are
refused (exit 2): use another --out, or delete the progress file and its shards to start over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_parser() -> argparse.ArgumentParser:
    from iomm_scale.parallel.groups import env_from_slurm

    env_from_slurm()  # under bare srun: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* from SLURM's variables
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config (YAML) with a data.webdataset section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. data.resolution=512)")
    p.add_argument("--out", required=True, help="output prefix")
    p.add_argument("--device", default=None, help="default: cuda (local rank) when available, else cpu")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage dtype (float16 halves the size; float32 keeps the encoders' values exactly)")
    p.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size")
    p.add_argument("--max-count", type=int, default=1000, help="samples per feature shard at most")
    p.add_argument("--max-size-mb", type=float, default=1000.0, help="feature shard size in MB at most")
    p.add_argument("--num-workers", type=int, default=None, help="default: data.webdataset.num_workers")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from iomm_scale.config import ConfigError, load_config
    from iomm_scale.data.features import encoder_fingerprint, precompute_feature_shards
    from iomm_scale.data.stream import build_webdataset_loader
    from iomm_scale.data.writer import brace_pattern
    from iomm_scale.iomm import build_iomm
    from iomm_scale.train.trainer import check_inputs

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    wds_cfg = cfg.data.webdataset
    if cfg.data.source != "webdataset" or wds_cfg is None:
        print(f"error: {args.config}: data.source must be 'webdataset' with a data.webdataset section", file=sys.stderr)
        return 2
    if wds_cfg.features:
        print("error: data.webdataset.features is true: the config already reads feature shards", file=sys.stderr)
        return 2
    try:
        check_inputs(cfg, init_from=False)  # shards exist: before the VAE and the MLLM are loaded
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    model = build_iomm(cfg, device=device).eval()
    # every sample records what made it; the trainer refuses features of other encoders
    meta = {"encoders": encoder_fingerprint(model.vae, model.conditioner), "resize_filter": wds_cfg.resize_filter}
    resolution, batch_size = cfg.data.resolution, args.batch_size or cfg.data.batch_size
    suffix = f"-r{args.rank:03d}" if args.world_size > 1 else ""
    report = {}
    for kind, shards in (("image", wds_cfg.image_shards), ("paired", wds_cfg.paired_shards)):
        if not shards:
            continue
        # One ordered pass: no shuffle, one epoch, every caption kept for paired shards.
        one_pass = dataclasses.replace(
            wds_cfg, image_shards=shards if kind == "image" else [], paired_shards=shards if kind == "paired" else [],
            image_only_fraction=0.0 if kind == "paired" else 1.0, epochs=1, resample=False, shuffle_buffer=1,
            drop_last=False, num_workers=wds_cfg.num_workers if args.num_workers is None else args.num_workers)
        loader = build_webdataset_loader(one_pass, resolution, batch_size, args.rank, args.world_size, seed=0)
        progress = f"{args.out}-{kind}{suffix}.progress.json"
        try:
            summary = precompute_feature_shards(
                loader, model.vae.encode, model.conditioner.vision_features, f"{args.out}-{kind}{suffix}-%06d.tar",
                resolution, device=device, dtype=args.dtype, max_count=args.max_count, max_size_mb=args.max_size_mb,
                meta=meta, progress=progress, log=lambda line, kind=kind: print(f"[rank {args.rank}] {kind}: {line}",
                                                                                 flush=True))
        except ValueError as e:  # a progress file of another pass, or of another data setup
            print(f"error: cannot resume: {e}", file=sys.stderr)
            return 2
        stats, resumed = summary["stats"], summary["resumed"]
        if resumed == "complete":
            print(f"[rank {args.rank}] {kind}: already complete ({progress}), nothing redone")
        elif resumed is not None:
            print(f"[rank {args.rank}] {kind}: resumed at shard {resumed['shard']} after {resumed['samples']} samples "
                  f"({progress})")
        print(f"[rank {args.rank}] {kind}: {summary['samples']} samples -> {len(summary['shards'])} shards "
              f"({summary['bytes'] / 1e6:.1f} MB); skipped {stats.get('bad', 0)} bad samples, "
              f"{stats.get('shard_errors', 0)} bad shards: "
              f"{json.dumps({r: n for r, n in stats.get('reasons', {}).items() if n})}")
        if summary["shards"]:
            report[f"{kind}_shards"] = [brace_pattern(summary["shards"])]
    reports = _gather(report, args.world_size)
    if reports is None:  # several processes without a process group to gather over: each prints its own
        print(f"[rank {args.rank}] config for training on this rank's features (list every rank's patterns):")
    elif args.rank != 0:
        return 0
    else:
        report = {k: [p for r in reports for p in r.get(k, [])] for k in ("image_shards", "paired_shards")}
        report = {k: v for k, v in report.items() if v}
        print("config for training on these features" + (f" (all {args.world_size} ranks' shards)" if
                                                          args.world_size > 1 else "") + ":")
    # the resolution and model they were made for travel with them: features are tied to both
    print(json.dumps({"data": {"source": "webdataset", "resolution": resolution,
                               "webdataset": {"features": True, **report}}}, indent=2))
    return 0


def _gather(report: dict, world_size: int) -> list[dict] | None:
    """Every rank's shard patterns on rank 0 (a gloo group over torchrun's rendezvous), so the
    printed config lists all of them; [report] for one process; None without a rendezvous."""
    if world_size == 1:
        return [report]
    if "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out: list = [None] * world_size
    dist.all_gather_object(out, report)
    dist.destroy_process_group()
    return out


if __name__ == "__main__":
    sys.exit(main())
