"""Atomic training checkpoints.

Layout:  <run_dir>/checkpoints/step_00000100/state.pt   (+ `latest`, a file naming the newest)

A checkpoint is written to `step_N.tmp/`, fsynced, then renamed to `step_N/`; `latest` is
replaced atomically afterwards. A crash at any moment leaves the previous checkpoint
intact and `latest` pointing at a complete one (or naming a step whose directory is gone
for an instant: writing step N again moves the old `step_N/` aside to `step_N.old/` first,
and `find_latest` takes that one when `step_N/` is missing). Frozen weights (the MLLM, the VAE) are
saved only when they cannot be reloaded from a path (random init), so checkpoints of real
runs hold just what training changes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that does not fit this run (another model config, layout or data setting):
    the command-line tools print it as one line and exit 2, like a config error."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to `<path>.tmp`, fsync, rename: a reader sees the old file or the whole new
    one, never a partial write (per-rank files beside DeepSpeed checkpoints, exports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(ckpt_root: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    previous = root / f"step_{step:08d}.old"  # this step written before: kept until the new one is in place
    if final.exists():
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(final, previous)
    os.replace(tmp, final)
    latest_tmp = root / f"{LATEST}.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    shutil.rmtree(previous, ignore_errors=True)
    prune_steps(root, keep, final.name)
    return final


def prune_steps(root: str | os.PathLike, keep: int, current: str) -> None:
    """Remove all but the newest `keep` step_N directories of `root` (never `current`)."""
    for old in sorted(p for p in Path(root).iterdir() if _STEP_DIR.match(p.name) and p.is_dir())[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


_STEP_DIR = re.compile(r"step_(\d+)$")
_PREVIOUS_DIR = re.compile(r"step_(\d+)\.old$")


def find_latest(ckpt_root: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names when it is complete, else the newest complete one; a
    `step_N.old/` stands in for a missing `step_N/` (a crash while step N was re-written)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    marker = root / LATEST
    if marker.exists():
        path = root / marker.read_text().strip()
        if (path / "state.pt").exists():
            return path
    done = {}
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name) or _PREVIOUS_DIR.match(p.name)
        if m and (p / "state.pt").exists() and (int(m.group(1)) not in done or m.re is _STEP_DIR):
            done[int(m.group(1))] = p
    return done[max(done)] if done else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    file = path / "state.pt" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {file})")
    return torch.load(file, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- layout-free checkpoints
def full_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A layout-free checkpoint directory (`full_pp{s}.pt`); `<dir>.old` stands in for a missing
    `<dir>` (a crash between the two renames of `replace_dir`)."""
    p = Path(path)
    old = p.with_name(p.name + ".old")
    return old if not p.exists() and any(old.glob("full_pp*.pt")) else p


def read_full_parts(where: str | os.PathLike) -> list[dict]:
    """The files of a layout-free checkpoint (`parallel/reshard.save_full`: `full_pp{s}.pt`, one
    per pipeline stage of the saving layout), checked to be one save: as many files as that
    layout had stages, all of the same step. Files of two saves (say a pp=2 save overwritten by a
    pp=1 save before saves replaced the directory whole) would mix two runs' weights."""
    where = full_checkpoint_dir(where)
    files = sorted(where.glob("full_pp*.pt"))
    if not files:
        raise CheckpointError(f"{where}: no full_pp*.pt layout-free checkpoint here (written by a launcher's "
                              "--save-full into <run_dir>/full)")
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    steps = {int(part["iomm_step"]) for part in parts}
    stages = {int(part["layout"]["pp"]) for part in parts}
    if len(steps) > 1 or len(stages) > 1 or len(files) != stages.pop():
        found = ", ".join(f"{f.name} (step {part['iomm_step']}, pp {part['layout']['pp']})" for f, part in zip(files, parts))
        raise CheckpointError(f"{where}: the full_pp*.pt files are not one save: {found}; a layout-free "
                              "checkpoint holds one file per pipeline stage of the layout that saved it, all of one step")
    return parts


def replace_dir(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete directory `staging` in place of `final`: the old one is moved to
    `<final>.old` first and removed after, so a crash leaves one whole copy (full_checkpoint_dir)."""
    staging, final = Path(staging), Path(final)
    previous = final.with_name(final.name + ".old")
    if final.exists():
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(final, previous)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(previous, ignore_errors=True)


# --------------------------------------------------------------------------- train.init_from
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory, or its `checkpoints/`, stands for the newest complete single-process
    checkpoint in it; any other path is returned as given."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        if root.is_dir() and ((root / LATEST).is_file() or any(_STEP_DIR.match(c.name) for c in root.iterdir())):
            found = find_latest(root)
            if found is not None:
                return found
    return p


def init_source(path: str | os.PathLike, label: str = "train.init_from") -> tuple[str, Path]:
    """What `train.init_from` points at, checked before anything is built: ("single", file)
    for a single-process checkpoint (an iomm-train `step_N/`, its `state.pt`, or a launcher
    run's EMA export `<run_dir>/ema/`), ("full", dir) for a layout-free checkpoint
    (`--save-full`: `full_pp*.pt`); a run directory stands for its newest single-process
    checkpoint. A DeepSpeed checkpoint is refused with what to use instead."""
    p = resolve_checkpoint(path)
    if not p.exists() and full_checkpoint_dir(p).exists():
        return "full", full_checkpoint_dir(p)
    if not p.exists():
        raise ValueError(f"{label}={path}: no such file or directory")
    if p.is_file():
        return "single", p
    if (p / "state.pt").is_file():
        return "single", p / "state.pt"
    if any(p.glob("full_pp*.pt")):
        return "full", p
    if (p / LATEST).is_file() or any(p.glob("*model_states.pt")) or any(p.glob("*/*model_states.pt")):
        raise ValueError(f"{label}={path}: a DeepSpeed checkpoint (a launcher run's, one file per rank "
                         "and layout): start from that run's EMA export <run_dir>/ema (written at the end of a "
                         "run with optim.ema_decay) or its layout-free copy <run_dir>/full (launcher --save-full), "
                         "or write both for this checkpoint: relaunch the run's layout with --export DIR "
                         "train.resume=<this step_N directory>")
    raise ValueError(f"{label}={path}: no state.pt (single-process checkpoint or EMA export) and no "
                     "full_pp*.pt (layout-free checkpoint) in this directory (for a launcher run give "
                     "<run_dir>/ema or <run_dir>/full)")


def read_init_weights(path: str | os.PathLike, use_ema: bool, label: str = "train.init_from"
                      ) -> tuple[dict[str, torch.Tensor], dict[str, dict], str, str | None]:
    """(trainable weights under single-process names, frozen modules' state dicts, a description,
    the LoRA base checksum the weights were trained on or None) from `train.init_from` (or
    iomm-sample's --checkpoint): the EMA weights when `use_ema` and the checkpoint has them."""
    kind, where = init_source(path, label)
    if kind == "single":
        state = load_checkpoint(where)
        ema = state.get("ema") or {}
        base = state.get("lora_base")
        if use_ema and ema.get("shadow"):
            return ema["shadow"], state.get("frozen", {}), f"{path} (EMA weights)", base
        return state["model"], state.get("frozen", {}), f"{path}", base
    params, ema = {}, {}
    for part in read_full_parts(where):  # one file per pipeline stage, distinct names
        params.update(part["params"])
        ema.update(part.get("ema") or {})
    if use_ema and ema:
        return ema, {}, f"{path} (EMA weights)", None
    return params, {}, f"{path}", None


def load_data_position(loader, state: dict, exact: bool, source: str) -> None:
    """The loader's saved position (`train.resume_data_exact`: false restarts a changed stream at
    its saved epoch); a setup that cannot resume exactly is a CheckpointError naming what changed."""
    try:
        loader.load_state_dict(state, strict=exact)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def check_lora_base(saved: str, mine: str, source: str) -> None:
    """LoRA adapters apply to the base generator they were trained on (its frozen-weight checksum)."""
    if saved != mine:
        raise CheckpointError(f"{source}: its LoRA adapters were trained on another base generator (frozen-weight "
                              f"checksum {saved} != {mine}): check model.generator.path / train.seed")


def refuse_nonfinite(source: str, bad: list[str], what: str = "weights") -> None:
    """A loaded checkpoint whose `bad` tensors hold NaN / inf (written after a run diverged, before
    train/nonfinite.py kept such steps out) is refused, naming them."""
    if bad:
        from .nonfinite import some_names

        raise CheckpointError(f"{source}: its {what} are not finite (NaN / inf in {some_names(bad)}): written after "
                              "the run diverged? Start from an earlier checkpoint")


def check_finite(tensors: dict[str, torch.Tensor], source: str, what: str = "weights") -> None:
    from .nonfinite import nonfinite_names

    refuse_nonfinite(source, nonfinite_names(tensors.items()), what)


@torch.no_grad()
def copy_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy `weights` (single-device names) into `model`'s parameters, strictly: every trainable
    parameter must be there, every name must be one of the model's parameters, every shape must
    match (`copy_` would broadcast a [1, d] tensor into [16, d] without a word), every value
    finite. `source` starts each error message (e.g. "train.init_from=runs/x")."""
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
    if missing:
        raise CheckpointError(f"{source}: checkpoint lacks {len(missing)} trainable parameters, e.g. {missing[:5]} "
                              "(another model config?)")
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CheckpointError(f"{source}: checkpoint has {len(unknown)} parameters this model lacks, e.g. "
                              f"{unknown[:5]} (another model config?)")
    for n, v in weights.items():
        if v.shape != params[n].shape:
            raise CheckpointError(f"{source}: {n} has shape {tuple(v.shape)} in the checkpoint, "
                             f"{tuple(params[n].shape)} in this model (another model config?)")
    check_finite(weights, source)
    for n, v in weights.items():
        params[n].copy_(v)


@torch.no_grad()
def apply_init_weights(model: torch.nn.Module, path: str | os.PathLike, use_ema: bool,
                       label: str = "train.init_from") -> str:
    """Copy `train.init_from`'s (or iomm-sample's --checkpoint's) weights into the single-device
    `model`: every trainable parameter, and any frozen one the checkpoint carries (`copy_weights`,
    strict), plus frozen modules' state; returns what was read. LoRA adapters are refused on
    another base generator than the one they were trained on."""
    weights, frozen, what, base = read_init_weights(path, use_ema, label)
    if base is not None:
        from ..models.lora import base_fingerprint

        check_lora_base(base, base_fingerprint(model.generator), f"{label}={path}")
    copy_weights(model, weights, f"{label}={path}")
    modules = dict(model.named_modules())
    for name, sd in frozen.items():
        modules[name].load_state_dict(sd)
    return what
