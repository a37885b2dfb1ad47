"""Child process of test_memory.py: peak resident memory of real training steps.

    python tests/profiling/_measure_memory.py FAMILY:CHECKPOINTING [...]

For each case: build the Trainer (model, AdamW, EMA, data), wrap the generator's blocks for
activation checkpointing (parallel/checkpointing.py), run one step (so optimizer state
exists), then reset the kernel's peak-RSS mark and run one more step. Printed per case (one
JSON line): the peak RSS of that step above the RSS measured before the Trainer was built.
A throw-away warm-up case first loads every library, so imports do not count.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from iomm_scale.profiling.profile import peak_rss, release_freed_memory, reset_peak_rss, rss  # noqa: E402

release_freed_memory()  # before torch allocates anything

import torch  # noqa: E402

from _memory_cases import make_cfg  # noqa: E402
from iomm_scale.parallel.checkpointing import apply_to_model  # noqa: E402
from iomm_scale.train.trainer import Trainer  # noqa: E402


def measure(family: str, mode: str, batch: int = 4, resolution: int = 128) -> dict:
    cfg = make_cfg(family, batch, resolution)
    gc.collect()
    base = rss()
    with tempfile.TemporaryDirectory(prefix="iomm_mem_") as run_dir:
        trainer = Trainer(cfg, run_dir=run_dir)
        apply_to_model(trainer.model, mode, every_k=2)
        trainer.train_step()
        gc.collect()
        static = rss() - base
        reset_peak_rss()
        trainer.train_step()
        peak = peak_rss() - base
        del trainer
    gc.collect()
    return {"family": family, "checkpointing": mode, "peak": peak, "static": static}


if __name__ == "__main__":
    torch.set_num_threads(1)
    measure("flux", "full", batch=1, resolution=32)  # warm-up: imports, allocator and kernel caches
    for spec in sys.argv[1:]:
        family, mode = spec.split(":")
        print(json.dumps(measure(family, mode)), flush=True)
