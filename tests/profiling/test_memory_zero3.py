"""The memory planner (profiling/memory.py) against the measured per-rank peak of a real
DeepSpeed ZeRO-3 training step across 2 processes (gloo, CPU, fp32, AdamW).

One torchrun launch of tests/profiling/_measure_memory_zero3.py: the IOMM model of
`_memory_cases.make_zero3_cfg()` (tiny random InternVL, RQA, FLUX at hidden 256 = 7.2M
trainable parameters, pixel VAE at 128 px, micro-batch 2 per rank), built and handed to
`ParallelRuntime.build` the way the launchers do (DeepSpeed's default ZeRO-3 settings), with
activation checkpointing none and full; per rank, the peak RSS of the second step above the
RSS before the model was built. Three quarters of that peak or more is ZeRO-3 state
(partitions, the fp32 master, the gradient bucket, gathered and persistent parameters), so a
planner that did not partition, or that ignored DeepSpeed's buffers, misses the band.
"""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _memory_cases import ZERO3_DP, start_zero3, zero3_plan, zero3_plans_while_running, zero3_results  # noqa: E402

from iomm_scale.profiling import memory as M  # noqa: E402

TOL = 0.15
MODES = ("none", "full")  # activation checkpointing; both in one launch (~5 s more than one)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc (peak RSS reset)")
    out = str(tmp_path_factory.mktemp("zero3_mem") / "zero3_memory.json")
    proc = start_zero3(out, MODES)

    def make_plans():  # while the 2 processes run
        cache: dict = {}
        return {m: {"zero3": zero3_plan(m, cache),
                    "zero3 without partitioning": zero3_plan(m, cache, dp=1),
                    "single process": zero3_plan(m, cache, dp=1, zero_stage=0)} for m in MODES}

    plans = zero3_plans_while_running(proc, make_plans)
    rows = zero3_results(proc, out)
    return {m: [r for r in rows if r["case"] == m] for m in MODES}, plans


def test_the_launch_ran_zero3_with_deepspeed_defaults(case):
    measured, _ = case
    for mode in MODES:
        assert sorted(r["rank"] for r in measured[mode]) == list(range(ZERO3_DP))
        for r in measured[mode]:
            assert r["zero_stage"] == 3 and r["dp"] == ZERO3_DP and r["contiguous_gradients"]
            # the planner's defaults are DeepSpeed's, which the launchers keep
            assert r["reduce_bucket_size"] == M.DS_REDUCE_BUCKET
            assert r["prefetch_bucket_size"] == M.DS_PREFETCH_BUCKET
            assert r["max_live_parameters"] == M.DS_MAX_LIVE_PARAMETERS
            assert r["persistence_threshold"] == M.DS_PERSISTENCE_THRESHOLD


@pytest.mark.parametrize("mode", MODES)
def test_planner_matches_each_rank_under_zero3(case, mode):
    measured, plans = case
    plan = plans[mode]["zero3"]
    for r in measured[mode]:
        assert abs(plan.allocated / r["peak"] - 1) < TOL, (mode, r["rank"], plan.allocated / 2**20,
                                                           r["peak"] / 2**20, plan.table())


@pytest.mark.parametrize("mode", MODES)
def test_the_zero3_model_is_what_gets_there(case, mode):
    """The same ZeRO-3 terms without partitioning (dp 1) land far above every rank's peak;
    the single-process layout (no partitioning, none of DeepSpeed's buffers) far below."""
    measured, plans = case
    for r in measured[mode]:
        assert plans[mode]["zero3 without partitioning"].allocated / r["peak"] > 1 + TOL
        assert plans[mode]["single process"].allocated / r["peak"] < 1 - TOL
    plan = plans[mode]["zero3"]  # the ZeRO-3 state is most of the peak: the case has teeth
    zero3 = sum(plan.component(n) for n in ("parameters", "gradients", "optimizer states", "zero3 persistent params",
                                            "zero3 gathered params", "comm buckets"))
    assert zero3 > 0.5 * plan.allocated


def test_activations_still_count_under_zero3(case):
    measured, plans = case
    assert min(r["peak"] for r in measured["none"]) > 1.15 * max(r["peak"] for r in measured["full"])
    assert plans["none"]["zero3"].component("activations") > 2 * plans["full"]["zero3"].component("activations")
