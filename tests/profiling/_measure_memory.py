"""Child process of test_memory.py: peak resident memory of real training steps.

    python tests/profiling/_measure_memory.py FAMILY:CHECKPOINTING[:COMPILE] [...]

For each case: build the Trainer (model, AdamW, EMA, data), wrap the generator's blocks for
activation checkpointing (parallel/checkpointing.py), run one step (so optimizer state
exists), then reset the kernel's peak-RSS mark and run one more step. Printed per case (one
JSON line): the peak RSS of that step above the RSS measured before the Trainer was built.
COMPILE on / all: train.compile (/ + train.compile_mllm) with the backend
aot_eager_decomp_partition (inductor's partitioner, so inductor's saved activations, without
a C compiler's time). A throw-away warm-up case first loads every library, so imports do not count.
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


def measure(family: str, mode: str, batch: int = 4, resolution: int = 128, compile: str = "off") -> dict:
    cfg = make_cfg(family, batch, resolution)
    if compile != "off":
        cfg.train.compile, cfg.train.compile_backend = True, "aot_eager_decomp_partition"
        cfg.train.compile_mllm = compile == "all"
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
    return {"family": family, "checkpointing": mode, "compile": compile, "peak": peak, "static": static}


if __name__ == "__main__":
    torch.set_num_threads(1)
    measure("flux", "full", batch=1, resolution=32)  # warm-up: imports, allocator and kernel caches
    if any(spec.count(":") > 1 for spec in sys.argv[1:]):
        measure("flux", "none", batch=1, resolution=32, compile="all")  # ... and torch.compile's
    for spec in sys.argv[1:]:
        family, mode, *compile = spec.split(":")
        print(json.dumps(measure(family, mode, compile=compile[0] if compile else "off")), flush=True)
