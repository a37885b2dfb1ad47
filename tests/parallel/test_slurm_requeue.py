"""The SLURM batch script's preemption path, end to end, without a SLURM cluster.

`launchers/slurm/pretrain.sbatch` runs as SLURM would run it (bash, SLURM_* variables), with
two stand-ins on PATH for the SLURM commands it calls: `srun` starts SLURM_NTASKS copies of
the task with SLURM_PROCID / SLURM_LOCALID set (as srun does) and forwards SIGTERM to them;
`scontrol` answers `show hostnames` and records `requeue`. Everything else is real: the
launcher maps SLURM's variables to torch.distributed's, 2 gloo processes train (TP=2).

SIGUSR1 to the script (what `--signal=B:USR1@180` delivers) must make the tasks agree to
stop at a step boundary, save a checkpoint and exit 0, and the script requeue its own job
id. Running the script again with the same job id (a requeued job keeps it) must resume
from that checkpoint and finish.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SRUN = """#!/bin/bash
# stand-in for srun: one task per SLURM_NTASKS on this host, options before the command ignored
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for p in "${pids[@]}"; do
  while true; do
    wait "$p"; r=$?
    kill -0 "$p" 2>/dev/null || break  # wait was interrupted by the trap: wait again
  done
  (( r > rc )) && rc=$r
done
exit $rc
"""

SCONTROL = """#!/bin/bash
# stand-in for scontrol: the two calls the batch scripts make
case "$1" in
  show) echo localhost ;;
  requeue) echo "requeue $2" >> "$REQUEUE_LOG" ;;
  *) echo "unexpected scontrol $*" >&2; exit 1 ;;
esac
"""


def _bin(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    # `python` in the script is this interpreter (a wrapper, not a link: a venv is found from the path run)
    (bindir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bindir / "python").chmod(0o755)
    return bindir


def _env(tmp_path, bindir, steps):
    overrides = ["train.log_every=1", "data.batch_size=2", "data.resolution=16", "data.builtin.crops_per_photo=1",
                 "parallel.tp=2", "parallel.zero_stage=1", f"train.steps={steps}", "train.ckpt_every=0"]
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "iomm-test", "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "2",
            "CONFIG": "configs/tiny.yaml", "RUN_DIR": str(tmp_path / "run"), "OVERRIDES": " ".join(overrides),
            "REQUEUE_LOG": str(tmp_path / "requeue.log"), "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore"}


def _signal_once(cmd, env, log, ready, poll=0.2) -> int:
    """Run the batch script `cmd`, SIGUSR1 it once `ready()` holds, and return its exit status. In
    its own session: a failed assertion kills the whole job (tasks that would otherwise hold the
    port and both cores long after the test)."""
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not ready():
                assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(poll)
            job.send_signal(signal.SIGUSR1)
            return job.wait(timeout=300)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)


def test_sigusr1_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path):
    bindir = _bin(tmp_path)
    log = tmp_path / "first.log"
    rc = _signal_once(["bash", "launchers/slurm/pretrain.sbatch"], _env(tmp_path, bindir, steps=100_000), log,
                      lambda: "[iomm] step 2 " in log.read_text())  # training is under way
    text = log.read_text()
    assert rc == 0, text[-3000:]
    stopped = re.search(r"stopped by signal at step (\d+)", text)
    assert stopped, text[-3000:]
    k = int(stopped.group(1))
    assert k >= 2 and (tmp_path / "requeue.log").read_text() == "requeue 4242\n"

    # the requeued job: same job id, same run dir -> resumes at step k and finishes
    again = subprocess.run(["bash", "launchers/slurm/pretrain.sbatch"], cwd=ROOT, capture_output=True, text=True,
                           env=_env(tmp_path, bindir, steps=k + 2), timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert f"at step {k}" in out and "resumed from" in out, out[-3000:]
    assert f"done at step {k + 2}" in out, out[-3000:]
    assert (tmp_path / "requeue.log").read_text() == "requeue 4242\n"  # no second requeue


def _raw_shards(folder, shards: int, per_shard: int) -> list[str]:
    """JPEG shards of noisy 48 x 40 images (as make_shards writes them)."""
    import io

    import numpy as np
    from PIL import Image

    from iomm_scale.data.writer import shard_writer

    rng = np.random.default_rng(0)
    with shard_writer(str(folder / "raw-%06d.tar"), per_shard, 1e9) as sink:
        for i in range(shards * per_shard):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            sink.write({"__key__": f"img{i:05d}", "jpg": buf.getvalue()})
    return [str(folder / f"raw-{s:06d}.tar") for s in range(shards)]


def _precompute_env(tmp_path, bindir, raw, out):
    args = ["--set=data.source=webdataset", f"--set=data.webdataset.image_shards=[{','.join(raw)}]",
            "--set=data.webdataset.num_workers=0", "--set=data.batch_size=2", "--max-count", "4"]
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4343",
            "SLURM_JOB_NAME": "iomm-precompute-test", "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "2",
            "CONFIG": "configs/tiny.yaml", "OUT": str(out), "ARGS": " ".join(args),
            "REQUEUE_LOG": str(tmp_path / "requeue.log"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_precompute_script_splits_by_task_and_a_requeued_job_ends_with_the_same_shards(tmp_path):
    """launchers/slurm/precompute.sbatch under the stand-in srun (2 tasks): each task is its own
    rank (SLURM_PROCID / SLURM_NTASKS, no torchrun), writes its share of the raw shards and rank 0
    prints one config with both ranks' shards. SIGUSR1 once both ranks have final feature shards
    stops the tasks and requeues the job; the requeued job resumes each rank from its progress
    file (a rank that had finished says so) and ends with the uninterrupted job's shards, byte
    for byte."""
    bindir = _bin(tmp_path)
    raw = _raw_shards(tmp_path, shards=4, per_shard=150)
    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    whole = subprocess.run(["bash", "launchers/slurm/precompute.sbatch"], cwd=ROOT, capture_output=True, text=True,
                           env=_precompute_env(tmp_path, bindir, raw, tmp_path / "whole" / "f"), timeout=300)
    out = whole.stdout + whole.stderr
    assert whole.returncode == 0, out[-3000:]
    assert "[rank 0] image: 300 samples -> 75 shards" in out and "[rank 1] image: 300 samples -> 75 shards" in out
    assert "all 2 ranks' shards" in out and "f-image-r000-{000000..000074}.tar" in out, out[-3000:]
    assert "f-image-r001-{000000..000074}.tar" in out

    log = tmp_path / "cut.log"
    rc = _signal_once(["bash", "launchers/slurm/precompute.sbatch"],
                      _precompute_env(tmp_path, bindir, raw, tmp_path / "cut" / "f"), log,
                      lambda: all(os.path.exists(tmp_path / "cut" / f"f-image-r00{r}.progress.json") for r in (0, 1)),
                      poll=0.05)
    assert rc == 0 and (tmp_path / "requeue.log").read_text() == "requeue 4343\n", log.read_text()[-3000:]
    assert any(p.name.endswith(".partial") for p in (tmp_path / "cut").iterdir())  # stopped mid-pass

    again = subprocess.run(["bash", "launchers/slurm/precompute.sbatch"], cwd=ROOT, capture_output=True, text=True,
                           env=_precompute_env(tmp_path, bindir, raw, tmp_path / "cut" / "f"), timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    # each rank goes on from its last finished shard; under load one rank may have finished its whole
    # share before the signal (the other one cannot have: it still had a shard in progress)
    resumed = [f"[rank {r}] image: resumed at shard" in out for r in (0, 1)]
    assert any(resumed) and all(done or f"[rank {r}] image: already complete" in out
                                for r, done in enumerate(resumed)), out[-3000:]
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == names
    for name in names:
        if name.endswith(".tar"):
            assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
