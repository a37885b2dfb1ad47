"""Process groups: torch.distributed start-up, megatron-core parallel_state, DeepSpeed's mpu.

Rank order is megatron's default "tp-cp-ep-dp-pp": tensor-parallel ranks are adjacent
(they talk every layer), then data parallel, then pipeline stages. With 8 ranks,
tp=2, pp=2: TP groups {0,1} {2,3} {4,5} {6,7}; DP groups {0,2} {1,3} {4,6} {5,7};
PP groups {0,4} {1,5} {2,6} {3,7}.

`init_distributed()` works under torchrun, the `deepspeed` launcher (both set RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK) and plain SLURM `srun` (maps
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the first host of SLURM_JOB_NODELIST).
It initialises torch.distributed itself (gloo without CUDA, nccl with), so DeepSpeed
finds it already initialised; see `deepspeed_engine.skip_cpu_shm_build` for why that
alone does not avoid DeepSpeed's CPU shm-op compile.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ParallelConfig, validate_layout


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Without scontrol: "node[003-005,007],gpu01" -> "node003".
    m = re.match(r"([^\[,]+)(?:\[([0-9]+))?", nodelist)
    if not m:
        return nodelist
    return m.group(1) + (m.group(2) or "")


def env_from_slurm() -> None:
    """Fill torch.distributed's env:// variables from SLURM's when launched by bare srun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if "MASTER_PORT" not in os.environ:
        # A job-specific port so two jobs sharing a node do not collide.
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)


def launch_world_size() -> int | None:
    """The world size the launcher (torchrun / deepspeed / srun) set up, before any process
    group exists; None in a plain single-process run."""
    env_from_slurm()
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> bool:
    """Initialise torch.distributed from the launcher's environment. Returns False (and does
    nothing) in a plain single-process run with no launcher variables."""
    if dist.is_initialized():
        return True
    env_from_slurm()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


@dataclass
class Layout:
    """This rank's place in the layout (read once from parallel_state)."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def tp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    def pp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_group()

    def dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    def __str__(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp} pp {self.pp_rank}/{self.pp} "
                f"dp {self.dp_rank}/{self.dp}")


def init_parallel_state(pcfg: ParallelConfig, model_info=None) -> Layout:
    """Validate `pcfg` against the world size, then build megatron-core's groups. One layout at a
    time per process: a previous layout's groups are destroyed first (destroy_parallel_state),
    so an engine built on them must be done with."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    validate_layout(pcfg, world, model_info)
    if not dist.is_initialized():
        raise RuntimeError("init_parallel_state needs torch.distributed; run under torchrun / deepspeed / srun")
    destroy_parallel_state()  # a previous layout's groups (a sweep, a notebook, a test building many)
    ps.initialize_model_parallel(tensor_model_parallel_size=pcfg.tp, pipeline_model_parallel_size=pcfg.pp)
    return current_layout()


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_parallel_state() -> None:
    """Tear down the layout's groups: megatron-core's globals and the process groups behind them.

    megatron's destroy_model_parallel() only forgets its groups; torch keeps every one alive (a
    gloo group holds 3 threads) until the default group goes. One process that builds layout
    after layout (a sweep, a notebook, the parallel test worker: 17 groups per 2-process layout)
    piled up ~2,000 threads per process over 35 layouts, and system time overtook the work."""
    from megatron.core import parallel_state as ps

    groups = getattr(ps, "_global_process_group_list", None) or []  # those this rank is a member of
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        from torch.distributed import distributed_c10d as c10d

        for group in groups:
            if group is not None and group in c10d._world.pg_map:  # None: megatron's name for WORLD
                dist.destroy_process_group(group)


class MegatronMPU:
    """The `mpu` object DeepSpeed wants, over megatron-core's parallel_state.

    `deepspeed.initialize(mpu=parallel_state)` fails: DeepSpeed calls
    get_model_parallel_{world_size,rank,group} and get_data_parallel_group_ranks, which
    megatron-core does not define. "Model parallel" here is megatron's TP x PP group, so
    the model-parallel rank is unique across stages (checkpoint files mp_rank_00..NN do not
    collide) and DeepSpeed's global gradient norm sums over every stage and TP shard.
    DeepSpeed sizes data parallelism and partitions ZeRO state within megatron's DP group.
    Replicated parameters (not `tensor_model_parallel`) are counted in the norm on TP
    rank 0 only, which is right because TP ranks hold identical copies of them.
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    # tensor parallel
    def get_tensor_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self):
        return self._ps.get_tensor_model_parallel_src_rank()

    # pipeline
    def get_pipeline_model_parallel_rank(self):
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

    # model parallel = TP x PP
    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.get_model_parallel_group())

    def get_model_parallel_rank(self):
        return dist.get_rank(self.get_model_parallel_group())

    # data parallel
    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.get_data_parallel_group())
