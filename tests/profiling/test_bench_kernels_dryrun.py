"""benchmarks/bench_kernels.py (gpu_check.sh stage `kernels`) at toy size on CPU: the script runs,
every op lands in one category, the shares add up, and matrix products are found."""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_kernels_dry_run(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_kernels.py"), "--dry-run", "--iters", "2",
                    "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = list(csv.DictReader(open(tmp_path / "kernels.csv")))
    assert [(r["block"], r["mode"]) for r in rows] == [("double", "eager"), ("single", "eager")]
    for r in rows:
        shares = [float(r[f"{c}_share"]) for c in ("matmul", "attention", "norm", "other")]
        assert abs(sum(shares) - 1) < 1e-6
        assert float(r["matmul_share"]) > 0.2 and float(r["attention_share"]) > 0
    assert "| `aten::mm` | matmul |" in (tmp_path / "kernels.md").read_text()


def test_bench_generator_kernels_dry_run(tmp_path):
    """benchmarks/bench_generator_kernels.py (stage `genkernels`): three variants, each in its own
    process, merged into one table, each row with the norm + RoPE configuration it ran (`base`
    the one IOMM_NORM_ROPE_CONFIG sets, `shipped` the built-in one); an unknown variant is
    refused by name."""
    script = os.path.join(ROOT, "benchmarks", "bench_generator_kernels.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IOMM_NORM_ROPE_CONFIG": "32,8,8,2"}
    subprocess.run([sys.executable, script, "--dry-run", "--variants", "base,shipped,unfused", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True, env=env)
    rows = list(csv.DictReader(open(tmp_path / "genkernels.csv")))
    assert [r["variant"] for r in rows] == ["base", "shipped", "unfused"]
    assert [r["norm_rope_config"] for r in rows] == ["32,8,8,2", "8,2,64,8", "-"]
    for r in rows:
        assert float(r["fwd_bwd_s"]) > 0 and int(r["kernels_per_step"]) > 0 and float(r["matmul_ms"]) > 0
    text = (tmp_path / "genkernels.md").read_text()
    assert "### base (norm+rope rows/warps 32,8,8,2): fwd+bwd" in text and "### unfused (norm+rope" in text
    bad = subprocess.run([sys.executable, script, "--dry-run", "--variants", "base,nosuch"], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "nosuch" in bad.stderr
