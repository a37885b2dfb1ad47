"""Distributed Muon on real gloo process groups (torchrun, CPU): 2 and 4 processes.

Each process group is launched once (start-up dominates on 2 cores) and runs every check in
tests/optim/_muon_worker.py; this file asserts on the JSON it writes. Reference: the one-device
MuonWithAdamW on the full batch, 3 steps, Newton-Schulz in fp32.

Tolerances (max over parameters of max|p - p_ref| / max|p_ref|):
  * same gradients as the reference (TP shards sliced from the full gradient, or every DP rank
    computing the full batch): <= 1e-6; observed bitwise (0.0).
  * data-sharded DP (gradients averaged over ranks): <= 5e-5; observed ~1e-5. Averaging changes
    gradients in the last bit; AdamW (eps 1e-8 on the near-zero time-embedder gradients) and
    Newton-Schulz (small singular values) magnify that.
  * Newton-Schulz on the local TP shard (the DeepSpeed #7807 pattern): must be >= 1e-2;
    observed 0.17-0.26. This is what makes the checks above meaningful.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_muon_worker.py")
EXACT, SHARDED_DATA, BROKEN = 1e-6, 5e-5, 1e-2


def launch(nproc: int, checks: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"muon_{nproc}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               # DeepSpeed's Muon kernels are torch.compile'd; inductor on 2 CPU cores costs
               # minutes and is not what is under test.
               TORCH_COMPILE_DISABLE="1", DS_BUILD_OPS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(WORKER), "--out", str(out), "--checks", checks]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return json.loads(out.read_text())["ranks"]


def assert_common(ranks: list[dict]):
    r0 = ranks[0]
    for name in [k for k in r0 if isinstance(r0[k], dict)]:
        assert all(r[name]["ranks_agree"] for r in ranks), f"{name}: ranks hold different parameters"
    # DP: every rank owns a share of the matrices, keeps momentum for exactly those, and the
    # shares are balanced by Newton-Schulz cost (within one matrix of each other).
    owned = [r["dp"]["owned_tensors"] for r in ranks]
    assert all(o > 0 for o in owned) and sum(owned) == 13  # 10 hidden + 3 AdaLN matrices
    assert all(r["dp"]["momentum_buffers"] == r["dp"]["owned_tensors"] for r in ranks)
    # Per-rank optimizer state round-trips: stop after step 1, reload, finish = same bits.
    assert all(r[k]["resume_bitwise"] for r in ranks for k in ("dp", "dp_exact_grads"))
    cost = r0["ns_cost_per_rank"]
    assert max(cost) / min(cost) < 1.1


def test_two_processes(tmp_path):
    ranks = launch(2, "dp,tp,deepspeed", tmp_path)
    r = ranks[0]
    assert_common(ranks)
    assert r["dp_exact_grads"]["max_rel"] <= EXACT
    assert r["dp"]["max_rel"] <= SHARDED_DATA
    assert r["tp"]["max_rel"] <= EXACT
    assert r["tp_per_shard"]["max_rel"] >= BROKEN  # the test has teeth

    # DeepSpeed 0.19.8 built-in Muon, ZeRO-3, 2 processes, against its own one-device Muon.
    ds = r["deepspeed"]
    assert ds["zero_stage"] == 3 and ds["inner"] == "MuonWithAuxAdam" and ds["aux"] == "AdamW"
    assert ds["muon_tensors"] == 15
    # Step 1 (identical gradients) is bitwise: Newton-Schulz ran on gathered full matrices.
    assert ds["max_rel_muon_per_step"][0] == 0.0
    # Later steps: gradients differ in the last bit under ZeRO-3 (its backward accumulates the
    # shared time embedding in another order), magnified as above.
    assert ds["max_rel"] <= SHARDED_DATA and ds["loss_diff"] <= 1e-6
    # It is not our Muon: name-only routing (proj_out, AdaLN to Muon) and whole-matrix q|k|v.
    assert ds["max_rel_vs_ours"] >= BROKEN
    # Ours configured with DeepSpeed's routing comes close; what is left (observed 6e-4) is its
    # X / (||X|| + 1e-7) normalisation, which matters where gradients are ~1e-4 (txt stream).
    assert ds["max_rel_vs_ours_ds_semantics"] < 1e-2


def test_four_processes(tmp_path):
    ranks = launch(4, "dp,tp,tp_dp", tmp_path)
    r = ranks[0]
    assert_common(ranks)
    assert r["dp_exact_grads"]["max_rel"] <= EXACT
    assert r["dp"]["max_rel"] <= SHARDED_DATA
    assert r["tp"]["max_rel"] <= EXACT  # TP=4: heads of 16 rows split over ranks, gathered whole
    assert r["tp_dp"]["max_rel"] <= SHARDED_DATA  # TP=2 x DP=2
    assert r["tp_per_shard"]["max_rel"] >= BROKEN
    assert r["tp_dp_per_shard"]["max_rel"] >= BROKEN
