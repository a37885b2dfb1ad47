"""Shared entry for the launcher scripts (pretrain.py, pretrain_xl.py, finetune.py).

    deepspeed launchers/pretrain.py --config configs/b.yaml [--run-dir DIR] [dotted.key=value ...]
    torchrun --nproc_per_node 8 launchers/pretrain.py --config ...
    srun python launchers/pretrain.py --config ...            (SLURM; env mapped in parallel/groups.py)

Same arguments as iomm-train, plus the `parallel.*` keys (tp, pp, zero_stage, ...).
The deepspeed launcher's `--local_rank N` is accepted and ignored (LOCAL_RANK is read
from the environment). A bad config, layout or input (missing shards, an unusable
train.init_from) exits with status 2 before any process group exists, with one message
(from the first rank) naming the file and key; torchrun / deepspeed then report the failed
child and exit 1 themselves. Feature shards made by other encoders than the run's are found
(and exit the same way) once the model is built, before the first step. More than
train.max_nonfinite_steps steps in a row with a NaN / inf loss or gradient norm checkpoint the
(untouched) weights and exit with status 4 on every rank (train/nonfinite.py).
`--export DIR` trains nothing: it resumes the run's checkpoint (same layout as it was written
under) and writes it as single-device files, DIR/full and DIR/ema, then exits.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_BUILD_OPS", "0")


def _config_error(message: str, kind: str = "config") -> None:
    """Exit 2 with the message, printed by the first process only (every rank finds the same
    problem; the launcher itself then reports its child's failure)."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"{kind} error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(description: str, default_config: str | None = None, argv=None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="YAML run config (see configs/)")
    parser.add_argument("--run-dir", help="checkpoints, metrics.jsonl (default runs/<name>)")
    parser.add_argument("--resume-full", help="layout-free checkpoint directory to start from (any layout)")
    parser.add_argument("--save-full", action="store_true", help="also write a layout-free checkpoint at the end")
    parser.add_argument("--export", metavar="DIR",
                        help="train nothing: write the checkpoint this launch resumes (train.resume: the run's "
                             "newest, or a step_N directory) as DIR/full (layout-free) and DIR/ema (EMA export)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. parallel.tp=2 train.steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --run-dir

    from iomm_scale.config import ConfigError
    from iomm_scale.parallel.config import LayoutError
    from iomm_scale.parallel.dist_trainer import DistributedTrainer, split_parallel_args
    from iomm_scale.train.checkpoint import CheckpointError

    try:
        cfg, pcfg = split_parallel_args(args.config, args.overrides)
        pcfg.validate_or_raise()  # the parts that need no world size, before start-up
    except (ConfigError, LayoutError) as e:
        _config_error(str(e))
    import warnings

    warnings.filterwarnings("ignore", module="megatron")
    try:
        trainer = DistributedTrainer(cfg, pcfg, run_dir=args.run_dir, resume_full=args.resume_full,
                                     save_full=args.save_full, export_to=args.export)
    except LayoutError as e:
        _config_error(f"{cfg.source}: parallel: {e}")
    except ConfigError as e:  # e.g. --save-full / --resume-full with Muon, missing shards, train.init_from
        _config_error(str(e))
    except CheckpointError as e:  # a checkpoint that does not fit (layout, model config, data setup)
        _config_error(str(e), "checkpoint")
    import torch.distributed as dist

    from iomm_scale.train.nonfinite import NonFiniteError

    try:
        if args.export:
            trainer.export()
        else:
            trainer.fit()
    except NonFiniteError as e:  # every rank stops at the same step (the skip is decided globally)
        if dist.get_rank() == 0:
            print(f"training error: {e}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        raise SystemExit(4) from None
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
