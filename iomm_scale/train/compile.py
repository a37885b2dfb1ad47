"""torch.compile for the generator, one block at a time (`train.compile`).

Per block rather than the whole model (as torchtitan does): every block of a family shares one
compiled graph, so compile time does not grow with depth, and activation checkpointing wraps
stay outside the compiled region. Shapes are static (`dynamic=False`): a run trains at one
micro-batch and resolution, and on torch 2.11 + H200 the dynamic-shape recompile that follows
a micro-batch change (8 -> 16) produced a backward that crashed ("shape '[1536, 128]' is invalid
for input of size 1920"); with static shapes each new shape gets its own graph instead.

Measured on an H200 (benchmarks/RESULTS.md): the IOMM-B generator step 1.49-1.56x faster than
eager, the whole IOMM step 1.75x. `inductor` needs a C compiler on CPU and Triton on CUDA;
`aot_eager` (no code generation) checks the traced graphs, and is what the CPU tests use;
`aot_eager_decomp_partition` adds inductor's decompositions and its partitioner (which decides
what the forward saves for backward) without code generation: same saved activations as
inductor, used by the CPU memory-planner test.
"""

from __future__ import annotations

import torch

COMPILE_BACKENDS = ("inductor", "aot_eager", "aot_eager_decomp_partition", "eager")
# what is compiled (iomm-profile --compile, the memory planner's Layout.compile): nothing; the
# generator blocks (train.compile); + the frozen LLM's decoder layers (train.compile_mllm)
COMPILE_MODES = ("off", "on", "all")


def _compile_each(modules: list[torch.nn.Module], backend: str) -> int:
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend must be one of {COMPILE_BACKENDS}, got {backend!r}")
    for module in modules:
        module.compile(backend=backend, dynamic=False)
    return len(modules)


def compile_blocks(generator: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile each transformer block of `generator` in place; returns how many."""
    return _compile_each(list(generator.blocks()), backend)


def frozen_mllm_layers(conditioner: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of the conditioner's frozen LLM (as checkpoint_mllm finds them);
    ValueError naming what is missing otherwise."""
    from ..parallel.checkpointing import find_mllm, mllm_decoder_layers

    mllm = find_mllm(conditioner)
    if mllm is None:
        raise ValueError("train.compile_mllm: the model has no conditioner MLLM (looked for .mllm / .language_model)")
    return mllm_decoder_layers(mllm)


def compile_frozen_mllm(conditioner: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder layer of the frozen LLM in place (`train.compile_mllm`); returns how
    many. It runs forward and the input-gradient backward every step (the RQA's gradient flows
    through it). Static shapes, as the generator's blocks: image-only pre-training has one
    condition length; with captions every new padded length is one more compile (dynamo stops
    at its recompile limit and runs further lengths eagerly)."""
    return _compile_each(frozen_mllm_layers(conditioner), backend)


def compile_layout_errors(tp: int, pp: int, zero_stage: int) -> list[tuple[str, str]]:
    """(run-config key, message) for the layouts train.compile refuses. Proved equal to one
    process (tests/parallel, aot_eager): data parallel with ZeRO 0-2, tensor parallel and
    pipeline parallel, with and without activation checkpointing. Refused: ZeRO-3, whose
    parameter-gathering hooks on every submodule split the compiled blocks at each module and
    whose gathered / released parameter shapes recompile them past dynamo's limit (measured on
    CPU, DP=2, a fresh process: 42 graphs and 50 recompilations for 4 blocks, the limit hit 3
    times, then eager), so it would cost compile time for nothing."""
    if zero_stage <= 2:
        return []
    return [("parallel.zero_stage", f"train.compile with zero_stage={zero_stage}: ZeRO-3's parameter gathering "
             "splits each compiled block at every submodule and recompiles it past dynamo's limit (it then runs "
             "mostly eagerly, for the compile time); use ZeRO 0-2 (or tensor / pipeline parallelism) with "
             "train.compile, or set it false")]


def compile_notes(tp: int, checkpointing: str = "none") -> list[str]:
    """What a compiled layout gives up, for the launch log."""
    notes = []
    if tp > 1:  # megatron's linears: an autograd Function whose backward all-reduces asynchronously
        notes.append("train.compile under tensor parallelism: megatron's parallel linears are not traced (their "
                     "backward all-reduces asynchronously), so each block compiles as the pieces between its "
                     "linears (norms, modulation, RoPE, activations: what compile fuses); the matmuls run as in eager")
        if checkpointing != "none":
            # a graph break inside torch.utils.checkpoint makes dynamo run the whole checkpointed call eagerly
            notes.append(f"train.compile with tensor parallelism and activation_checkpointing={checkpointing}: the "
                         "checkpointed blocks run eagerly (megatron's linears break the graph inside the checkpoint, "
                         "and dynamo then leaves the whole checkpointed block uncompiled); only the others compile")
    return notes


def compile_launch_errors(cfg) -> list[tuple[str, str]]:
    p = cfg.parallel
    return compile_layout_errors(p.tp, p.pp, p.zero_stage) if cfg.train.compile else []
