"""Console entry points: iomm-train, iomm-sample, iomm-eval, iomm-params (and `python -m
iomm_scale.cli export_lora / export_diffusers`).

All take `--config FILE [dotted.key=value ...]`; a bad config prints one clear message
naming the file and key, and exits with status 2 before any model is built.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=100")


def _load(args):
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        _fail("config", e)


def _fail(kind: str, error: Exception, code: int = 2) -> None:
    """One line on stderr and an exit status, instead of a traceback, for a refused input."""
    print(f"{kind} error: {error}", file=sys.stderr)
    raise SystemExit(code) from None


def _trained_model(cfg, checkpoint: str, use_ema: bool):
    """The config's model with a checkpoint's weights (sampling.load_trained), refusals as one line."""
    from .sampling import load_trained
    from .train.checkpoint import CheckpointError

    try:
        return load_trained(cfg, checkpoint, use_ema=use_ema)
    except CheckpointError as e:  # weights of another model config, adapters of another base
        _fail("checkpoint", e)


def train_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="iomm-train", description="Train an IOMM generator (one process).")
    _config_args(parser)
    parser.add_argument("--run-dir", help="where checkpoints, metrics.jsonl and PNGs go (default runs/<name>)")
    args = parser.parse_args(argv)
    cfg = _load(args)
    from .train.trainer import Trainer

    from .train.checkpoint import CheckpointError

    try:
        trainer = Trainer(cfg, run_dir=args.run_dir)
    except ConfigError as e:  # what the config alone could not vouch for (shards, init_from, layout)
        _fail("config", e)
    except CheckpointError as e:  # a checkpoint that does not fit this config (resume, init_from)
        _fail("checkpoint", e)
    from .data.errors import DataErrorBudgetExceeded

    from .train.nonfinite import NonFiniteError

    try:
        last = trainer.fit()
    except DataErrorBudgetExceeded as e:  # the configured stop: the message names the worst shards
        _fail("data", e, 3)
    except NonFiniteError as e:  # too many NaN / inf steps in a row: checkpointed, then stopped
        _fail("training", e, 4)
    if trainer.stopped_by_signal:
        return  # fit() said where the checkpoint is
    if not last:  # resumed at (or past) train.steps: nothing was trained in this launch
        print(f"done: the run is already at step {trainer.step} (train.steps={cfg.train.steps}; raise it, or "
              f"train.resume=never to start over); outputs in {trainer.run_dir}")
        return
    first = trainer.history[0][1] if trainer.history else float("nan")
    window = last.get("loss_steps", cfg.train.log_every)
    final = float("nan") if last["loss"] is None else last["loss"]
    skipped = f"; {trainer.nonfinite.total} non-finite steps skipped" if trainer.nonfinite.total else ""
    print(f"done: step {trainer.step}, loss {first:.4f} (first step) -> {final:.4f} "
          f"(mean of the last {window} step{'s' if window != 1 else ''}){skipped}; outputs in {trainer.run_dir}")


def sample_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="iomm-sample", description="Generate images from a trained run.")
    _config_args(parser)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint (…/checkpoints/step_N), a run dir (its newest), or an EMA export (<run_dir>/ema)")
    parser.add_argument("--images", nargs="*", default=[], help="reference images (image-conditioned generation)")
    parser.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg-scale", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="use the live weights even if the checkpoint has EMA")
    args = parser.parse_args(argv)
    if not args.images and not args.prompt:
        parser.error("give --images or --prompt")
    cfg = _load(args)
    _check_inputs(args.checkpoint, args.images)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)  # before sampling, not after it
    from .sampling import sample_from_checkpoint
    from .train.checkpoint import CheckpointError

    try:
        sample_from_checkpoint(cfg, args.checkpoint, args.images, args.prompt, args.out, args.steps, args.cfg_scale,
                               args.seed, use_ema=not args.no_ema)
    except CheckpointError as e:  # weights of another model config / LoRA base
        _fail("checkpoint", e)
    print(f"wrote {os.path.abspath(args.out)}")


def _check_inputs(checkpoint: str, images: list[str] = ()) -> None:
    """A checkpoint we can read and existing reference images, before any model is built."""
    from .train.checkpoint import init_source

    try:
        init_source(checkpoint, "--checkpoint")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        print(f"error: --images: no such file: {', '.join(missing)}", file=sys.stderr)
        raise SystemExit(2)
    from PIL import Image

    for p in images:  # readable as an image (header check, cheap)
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a non-image
            print(f"error: --images: {p} is not a readable image ({type(e).__name__}: {e})", file=sys.stderr)
            raise SystemExit(2) from None


def eval_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="iomm-eval",
                                     description="Held-out loss of trained checkpoints, as eval.* measures it during "
                                                 "training (the same samples, noise, masks and timesteps: figures "
                                                 "comparable with the run's eval/ lines). One JSON line per checkpoint.")
    _config_args(parser)
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a checkpoint (…/checkpoints/step_N), a run dir (its newest), an EMA export (<run_dir>/ema) "
                             "or a layout-free copy (<run_dir>/full); repeat it to compare several")
    parser.add_argument("--no-ema", action="store_true", help="the live weights even if a checkpoint has EMA")
    args = parser.parse_args(argv)
    if not any(o.startswith("eval.every=") for o in args.overrides):
        args.overrides = [*args.overrides, "eval.every=1"]  # the held-out set is required and checked
    cfg = _load(args)
    for path in args.checkpoint:
        _check_inputs(path)
    import json

    from .iomm import build_iomm
    from .train.checkpoint import CheckpointError, apply_init_weights
    from .train.evaluate import build_eval_set, describe_eval, evaluate_model
    from .train.trainer import check_feature_shards, check_inputs, resolve_device

    try:
        check_inputs(cfg, init_from=False)  # the held-out shards exist
        device = resolve_device(cfg.train.device)
        model = build_iomm(cfg, device)
        eval_set = build_eval_set(cfg, check_feature_shards(cfg, model))
    except ConfigError as e:
        _fail("config", e)
    print(describe_eval(cfg, eval_set, every=False), file=sys.stderr)
    for path in args.checkpoint:
        try:
            what = apply_init_weights(model, path, not args.no_ema, "--checkpoint")
        except CheckpointError as e:
            _fail("checkpoint", e)
        found = evaluate_model(model, eval_set, device, bf16=cfg.train.precision == "bf16")
        print(json.dumps({"checkpoint": what, **found}), flush=True)


def params_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="iomm-params", description="Exact parameter counts of a config, built on the meta device.")
    _config_args(parser)
    args = parser.parse_args(argv)
    cfg = _load(args)
    from .profiling.params import count_config, format_counts

    print(format_counts(cfg, count_config(cfg)))


def export_lora_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iomm_scale.cli export_lora",
                                     description="Write a LoRA run's checkpoint as diffusers LoRA weights "
                                                 "(pytorch_lora_weights.safetensors) + iomm_conditioner.safetensors.")
    _config_args(parser)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint (…/checkpoints/step_N), a run dir (its newest), or an EMA export (<run_dir>/ema)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-ema", action="store_true", help="the live weights even if the checkpoint has EMA")
    args = parser.parse_args(argv)
    cfg = _load(args)
    if cfg.model.lora is None:
        print(f"config error: {cfg.source}: model.lora: no LoRA section, nothing to export", file=sys.stderr)
        raise SystemExit(2)
    _check_inputs(args.checkpoint)
    from .models.lora import export_lora

    print(f"wrote {export_lora(_trained_model(cfg, args.checkpoint, not args.no_ema), args.out)}")


def export_diffusers_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iomm_scale.cli export_diffusers",
                                     description="Write a trained generator as a diffusers transformer folder "
                                                 "(<out>/transformer: config.json + safetensors, loadable with "
                                                 "from_pretrained) + the RQA / projection (iomm_conditioner.safetensors).")
    _config_args(parser)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint (…/checkpoints/step_N), a run dir (its newest), a launcher run's "
                             "<run_dir>/ema or <run_dir>/full")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-ema", action="store_true", help="the live weights even if the checkpoint has EMA")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="storage dtype of the transformer weights (default: float32, exact)")
    args = parser.parse_args(argv)
    cfg = _load(args)
    if cfg.model.lora is not None:
        print(f"config error: {cfg.source}: model.lora: a LoRA run's generator is its frozen base plus adapters; "
              "export the adapters with export_lora", file=sys.stderr)
        raise SystemExit(2)
    _check_inputs(args.checkpoint)
    import torch

    from .models.adapters import adapter_for
    from .models.lora import CONDITIONER_WEIGHTS_NAME, save_conditioner

    model = _trained_model(cfg, args.checkpoint, not args.no_ema)
    out = os.path.abspath(args.out)
    adapter_for(cfg.model.generator.family).save_diffusers(model.generator, os.path.join(out, "transformer"),
                                                           dtype=getattr(torch, args.dtype))
    save_conditioner(model, os.path.join(out, CONDITIONER_WEIGHTS_NAME))
    print(f"wrote {out}/transformer and {out}/{CONDITIONER_WEIGHTS_NAME}")


if __name__ == "__main__":  # python -m iomm_scale.cli {train,sample,eval,params,export_lora,export_diffusers} ...
    commands = {"train": train_main, "sample": sample_main, "eval": eval_main, "params": params_main,
                "export_lora": export_lora_main, "export_diffusers": export_diffusers_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: python -m iomm_scale.cli {{{','.join(commands)}}} --config FILE ...")
    commands[sys.argv[1]](sys.argv[2:])
