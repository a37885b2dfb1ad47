"""Per-rank peak memory of a real DeepSpeed ZeRO-3 training step across processes (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/profiling/_measure_memory_zero3.py OUT.json none full \
        none+small

Launched by tests/profiling/test_memory_zero3.py and `benchmarks/bench_throughput.py --memory
--zero3` (via `_memory_cases.start_zero3`). Each rank, per activation-checkpointing mode: builds
the IOMM model of `_memory_cases.make_zero3_cfg()` (tiny random InternVL, RQA, FLUX at hidden
256, pixel VAE at 128 px), hands it to `ParallelRuntime.build` the way
`parallel/dist_trainer.py` does (ZeRO-3 over the 2 data-parallel ranks, the run config's AdamW,
clipping and precision: fp32 on CPU, DeepSpeed's default ZeRO-3 settings), runs one step (so
the optimizer state exists), resets the kernel's peak-RSS mark and runs a second step (the
first with DeepSpeed's recorded module trace: prefetching and the reuse-distance rule act only
from then on). Reported per rank: that step's peak RSS above the RSS measured before the model
was built (as tests/profiling/_measure_memory.py does for one process: glibc returns freed
blocks to the OS; /proc/self/clear_refs resets the mark), and the resident set after the first
step ("static"). A throw-away ZeRO-3 warm-up case first
loads every library and initialises DeepSpeed's and gloo's one-off state.

A mode "MODE+small" runs the same case with DeepSpeed's ZeRO-3 buffers set far below their
defaults (`SMALL_BUFFERS`: the resident-parameter cap, reuse distance, prefetch and reduce
buckets all smaller than the model), to check the planner's terms for them.

DeepSpeed's CPU shm comm op is not compiled: `initialize_engine` calls
`deepspeed_engine.skip_cpu_shm_build()` (collectives go through gloo), as in tests/parallel.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_BUILD_OPS", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

from iomm_scale.profiling.profile import peak_rss, release_freed_memory, reset_peak_rss, rss  # noqa: E402

release_freed_memory()  # before torch allocates anything

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _memory_cases import SMALL_BUFFERS, ZERO3_DP, make_zero3_cfg  # noqa: E402
from iomm_scale.iomm import build_iomm  # noqa: E402
from iomm_scale.parallel.config import ParallelConfig  # noqa: E402
from iomm_scale.parallel.dist_trainer import optimizer_factory, precision_extra  # noqa: E402
from iomm_scale.parallel.groups import destroy_parallel_state, init_distributed, init_parallel_state  # noqa: E402
from iomm_scale.parallel.runtime import ParallelRuntime  # noqa: E402


def _batch(cfg, step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    n, res = cfg.data.batch_size, cfg.data.resolution
    return {"pixels": torch.rand(n, 3, res, res, generator=g) * 2 - 1}


def measure(cfg, spec: str, warm_up: bool = False) -> dict | None:
    mode, _, variant = spec.partition("+")
    pcfg = ParallelConfig(zero_stage=3, activation_checkpointing=mode)
    ds_extra = precision_extra(cfg, pcfg)
    if variant == "small":
        ds_extra["zero_optimization"] = {k: v for k, (_, v) in SMALL_BUFFERS.items()}
    elif variant:
        raise ValueError(f"unknown variant {variant!r}")
    lay = init_parallel_state(pcfg)
    gc.collect()
    dist.barrier()
    base = rss()
    torch.manual_seed(cfg.train.seed)
    model = build_iomm(cfg, "cpu")
    # what DistributedTrainer does (persistence_threshold None = DeepSpeed's default)
    rt = ParallelRuntime.build(model, pcfg, optimizer_factory(cfg), micro_batch=cfg.data.batch_size,
                               grad_clip=cfg.optim.grad_clip, seed=cfg.train.seed, ds_extra=ds_extra)
    del model
    t0 = time.time()
    rt.train_step(_batch(cfg, 0, lay.dp_rank))
    if warm_up:
        rt.engine.destroy()
        destroy_parallel_state()
        return None
    gc.collect()
    static = rss() - base
    dist.barrier()
    reset_peak_rss()
    t1 = time.time()
    out = rt.train_step(_batch(cfg, 1, lay.dp_rank))
    peak = peak_rss() - base
    t2 = time.time()
    row = {"case": spec, "checkpointing": mode, "variant": variant or "default", "rank": dist.get_rank(),
           "peak": peak, "static": static, "loss": out["loss"], "dp": lay.dp,
           "zero_stage": rt.engine.zero_optimization_stage(),
           "persistence_threshold": int(rt.engine.zero_param_persistence_threshold()),
           "reduce_bucket_size": int(rt.engine.zero_reduce_bucket_size()),
           "prefetch_bucket_size": int(rt.engine.zero_prefetch_bucket_size()),
           "max_live_parameters": int(rt.engine.zero_max_live_parameters()),
           "max_reuse_distance": int(rt.engine.zero_max_reuse_distance()),
           "contiguous_gradients": bool(rt.engine.zero_contiguous_gradients()),
           "step1_s": round(t1 - t0, 2), "step2_s": round(t2 - t1, 2)}
    try:
        rt.engine.destroy()
    except Exception:  # noqa: BLE001
        pass
    destroy_parallel_state()
    del rt
    gc.collect()
    return row


def main():
    out_path, modes = sys.argv[1], sys.argv[2:] or ["none"]
    init_distributed()
    torch.set_num_threads(1)
    if dist.get_world_size() != ZERO3_DP:
        raise SystemExit(f"launch with --nproc_per_node {ZERO3_DP}")
    measure(make_zero3_cfg(batch=1, resolution=32), "full", warm_up=True)  # imports, DeepSpeed / gloo one-off state
    rows = []
    for mode in modes:
        row = measure(make_zero3_cfg(), mode)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, row)
        rows += gathered
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)
        for r in rows:
            print(json.dumps(r), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
