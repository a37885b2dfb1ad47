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
    for old in sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
                         "run with optim.ema_decay) or its layout-free copy <run_dir>/full (launcher --save-full)")
    raise ValueError(f"{label}={path}: no state.pt (single-process checkpoint or EMA export) and no "
                     "full_pp*.pt (layout-free checkpoint) in this directory (for a launcher run give "
                     "<run_dir>/ema or <run_dir>/full)")


def read_init_weights(path: str | os.PathLike, use_ema: bool,
                      label: str = "train.init_from") -> tuple[dict[str, torch.Tensor], dict[str, dict], str]:
    """(trainable weights under single-process names, frozen modules' state dicts, a description)
    from `train.init_from` (or iomm-sample's --checkpoint): the EMA weights when `use_ema` and
    the checkpoint has them."""
    kind, where = init_source(path, label)
    if kind == "single":
        state = load_checkpoint(where)
        ema = state.get("ema") or {}
        if use_ema and ema.get("shadow"):
            return ema["shadow"], state.get("frozen", {}), f"{path} (EMA weights)"
        return state["model"], state.get("frozen", {}), f"{path}"
    params, ema = {}, {}
    for f in sorted(where.glob("full_pp*.pt")):  # one file per pipeline stage, distinct names
        part = torch.load(f, map_location="cpu", weights_only=True)
        params.update(part["params"])
        ema.update(part.get("ema") or {})
    if use_ema and ema:
        return ema, {}, f"{path} (EMA weights)"
    return params, {}, f"{path}"


@torch.no_grad()
def apply_init_weights(model: torch.nn.Module, path: str | os.PathLike, use_ema: bool) -> str:
    """Copy `train.init_from`'s weights into every trainable parameter of the single-device
    `model` (and frozen modules the checkpoint carries); returns what was read. A trainable
    parameter the checkpoint lacks is an error naming it."""
    weights, frozen, what = read_init_weights(path, use_ema)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(weights))
    if missing:
        raise KeyError(f"train.init_from={path}: checkpoint lacks {len(missing)} trainable parameters, e.g. {missing[:5]}")
    for n, p in trainable.items():
        if weights[n].shape != p.shape:
            raise ValueError(f"train.init_from={path}: {n} has shape {tuple(weights[n].shape)} in the checkpoint, "
                             f"{tuple(p.shape)} in this model (another model config?)")
        p.copy_(weights[n])
    modules = dict(model.named_modules())
    for name, sd in frozen.items():
        modules[name].load_state_dict(sd)
    return what
