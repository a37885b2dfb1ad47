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
