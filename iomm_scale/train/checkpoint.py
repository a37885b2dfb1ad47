"""Atomic training checkpoints.

Layout:  <run_dir>/checkpoints/step_00000100/state.pt   (+ `latest`, a file naming the newest)

A checkpoint is written to `step_N.tmp/`, fsynced, then renamed to `step_N/`; `latest` is
replaced atomically afterwards. A crash at any moment leaves the previous checkpoint
intact and `latest` pointing at a complete one. Frozen weights (the MLLM, the VAE) are
saved only when they cannot be reloaded from a path (random init), so checkpoints of real
runs hold just what training changes.
"""

from __future__ import annotations

import os
import random
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
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f"{LATEST}.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_latest(ckpt_root: str | os.PathLike) -> Path | None:
    root = Path(ckpt_root)
    marker = root / LATEST
    if marker.exists():
        path = root / marker.read_text().strip()
        if (path / "state.pt").exists():
            return path
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "state.pt").exists() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    file = path / "state.pt" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {file})")
    return torch.load(file, map_location="cpu", weights_only=False)
