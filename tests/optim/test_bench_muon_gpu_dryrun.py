"""benchmarks/bench_muon_gpu.py's dry run (toy sizes on CPU): the plumbing gpu_check.sh's "muon"
stage relies on -- files written, table columns, and every ratio computed from the measured times."""

import csv
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    path = os.path.join(ROOT, "benchmarks", "bench_muon_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_muon_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read(out):
    with open(os.path.join(out, "muon_steps.csv")) as f:
        steps = list(csv.DictReader(f))
    with open(os.path.join(out, "muon_ns_owners.csv")) as f:
        owners = list(csv.DictReader(f))
    with open(os.path.join(out, "muon.json")) as f:
        res = json.load(f)
    with open(os.path.join(out, "muon.md")) as f:
        md = f.read()
    return steps, owners, res, md


def table_rows(md, first_header):
    """Rows (lists of cells) of the markdown table whose first column is `first_header`."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[i:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[0], rows[2:]


def test_dry_run_measures_and_derives_ratios(bench, tmp_path):
    out = str(tmp_path)
    bench.main(["--device", "cpu", "--dry-run", "--out", out])
    steps, owners, res, md = read(out)
    accum = res["grad_accum"]
    assert accum == 8 and res["layers"] == 2 and res["ns_dtype"] == "float32"

    header, rows = table_rows(md, "checkpointing")
    assert header == ["checkpointing", "ms fwd+bwd", "ms Muon step", "Muon / fwd+bwd", "ms AdamW step",
                      "AdamW / fwd+bwd", f"Muon / ({accum} x fwd+bwd)", "goal <= 3%"]
    assert [r[0] for r in rows] == ["full", "none"] == [s["checkpointing"] for s in steps]
    for s in steps:
        fb, mu, ad = float(s["fwd_bwd_ms"]), float(s["muon_step_ms"]), float(s["adamw_step_ms"])
        assert s["status"] == "ok" and fb > 0 and mu > 0 and ad > 0
        assert float(s["muon_ratio"]) == pytest.approx(mu / fb, rel=1e-12)
        assert float(s["adamw_ratio"]) == pytest.approx(ad / fb, rel=1e-12)
        assert float(s["muon_ratio_per_opt_step"]) == pytest.approx(mu / (accum * fb), rel=1e-12)
        assert s["goal_met"] == str(mu / (accum * fb) <= 0.03)

    header, rows = table_rows(md, "owners")
    assert header[0] == "owners" and header[-1] == "goal <= 3%"
    assert [int(o["owners"]) for o in owners] == [1, 2, 4, 8, 32] == [int(r[0]) for r in rows]
    fb_full = float(steps[0]["fwd_bwd_ms"]) * res["full_over_bench_flops"]
    for o, raw in zip(owners, res["owners"]):
        assert float(o["critical_ms"]) == pytest.approx(max(raw["per_rank_ms"]), rel=1e-12)
        assert sum(raw["per_rank_ms"]) == pytest.approx(res["ns_full_ms"], rel=1e-9)  # every matrix owned once
        assert float(o["ratio_per_opt_step"]) == pytest.approx(float(o["critical_ms"]) / (accum * fb_full), rel=1e-12)
        assert float(o["direct_ms"]) > 0


@pytest.mark.parametrize("muon_ms, ratio, per_step, goal", [(5.0, "2.50%", "0.31%", "met"),
                                                            (400.0, "200.00%", "25.00%", "not met")])
def test_table_follows_the_timings(bench, tmp_path, monkeypatch, muon_ms, ratio, per_step, goal):
    """With known times substituted for the measurements, the table shows exactly their ratios."""
    fake = {"fwd_bwd": 200.0, "muon_step": muon_ms, "adamw_step": 1.0}
    monkeypatch.setattr(bench, "time_ms", lambda label, fn, *a, **k: fake.get(label.split(":")[0], 0.5))
    res = bench.main(["--device", "cpu", "--dry-run", "--checkpointing", "full", "--out", str(tmp_path)])
    _, rows = table_rows(bench.markdown(res), "checkpointing")
    assert rows == [["full", "200.0", bench._ms(muon_ms), ratio, "1", "0.50%", per_step, goal]]
