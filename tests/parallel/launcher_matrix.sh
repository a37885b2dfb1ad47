#!/bin/bash
# Launcher smoke matrix (not part of `make test`: ~8 minutes on 2 cores). Every supported layout
# x data source (built-in, raw webdataset, feature shards; all mixed, lambda 0.5, with a captioned
# held-out set) x optimizer, 2 steps each through launchers/finetune.py under torchrun; prints
# OK / FAIL per combination and exits 1 if any failed. The parity tests (test_dist.py) prove the
# maths on a few layouts; this finds the combinations that do not run at all (it found PP on
# webdataset shards crashing and ZeRO-3 deadlocking on mixed batches in the twelfth session).
#   bash tests/parallel/launcher_matrix.sh [work dir]
set -u
cd "$(dirname "$0")/../.."
work=${1:-$(mktemp -d)}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$work"
$py - "$work" > "$work/prepare.log" <<'PY' || exit 1
import os, sys
sys.path[:0] = ["tests/data", "tools"]
from data_shardkit import good_jpeg, write_shard
import precompute_features
d = sys.argv[1]
write_shard(f"{d}/img-000000.tar", [{"__key__": f"i{i:02d}", "jpg": good_jpeg(i)} for i in range(8)])
for name, first in (("pairs", 8), ("val", 20)):
    write_shard(f"{d}/{name}-000000.tar", [{"__key__": f"p{i:02d}", "jpg": good_jpeg(i),
                                            "txt": "a photo" + " of a thing" * (i % 3)} for i in range(first, first + 8)])
base = ["data.source=webdataset", "data.resolution=16", "data.webdataset.num_workers=0",
        "data.webdataset.min_image_size=12", "data.image_only_fraction=0.5"]
for name, kind in (("img", "image_shards"), ("pairs", "paired_shards"), ("val", "paired_shards")):
    args = ["--config", "configs/tiny.yaml", "--out", f"{d}/feat-{name}"]
    args += [f"--set={o}" for o in base + [f'data.webdataset.{kind}=["{d}/{name}-000000.tar"]']]
    assert precompute_features.main(args) == 0
PY
d=$work
declare -A DATA=(
  [builtin]="data.builtin.crops_per_photo=1"
  [raw]="data.source=webdataset data.webdataset.image_shards=[\"$d/img-000000.tar\"] data.webdataset.paired_shards=[\"$d/pairs-000000.tar\"] data.webdataset.num_workers=0 data.webdataset.min_image_size=12 eval.paired_shards=[\"$d/val-000000.tar\"]"
  [features]="data.source=webdataset data.webdataset.features=true data.webdataset.image_shards=[\"$d/feat-img-image-000000.tar\"] data.webdataset.paired_shards=[\"$d/feat-pairs-paired-000000.tar\"] data.webdataset.num_workers=0 eval.paired_shards=[\"$d/feat-val-paired-000000.tar\"]"
)
i=0
failed=0
run() {  # nproc config layout data-name extra...
  local n=$1 cfg=$2 layout=$3 data=${DATA[$4]} name=$4; shift 4
  i=$((i+1))
  local rd=$work/run$i
  eval "DS_BUILD_OPS=0 OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore timeout 300 $py -m torch.distributed.run --nproc_per_node $n --master_port $((29900 + i)) launchers/finetune.py --config $cfg --run-dir $rd train.steps=2 data.batch_size=2 data.resolution=16 train.num_samples=1 train.resume=never data.image_only_fraction=0.5 eval.every=2 eval.samples=3 $layout $data $*" > "$rd.log" 2>&1
  local rc=$?
  local what="[$n] $cfg | $layout | $name | $*"
  if [ $rc -eq 0 ] && grep -q 'done at step 2' "$rd.log"; then
    echo "OK   $what"
  else
    failed=1
    echo "FAIL $what (exit $rc, $rd.log): $(grep -v WARN "$rd.log" | grep -E 'Error|error:|what\(\)' | head -2 | cut -c1-200)"
  fi
}
for data in builtin raw features; do
  for layout in "parallel.zero_stage=0" "parallel.zero_stage=2" "parallel.zero_stage=3 parallel.activation_checkpointing=full" \
                "parallel.tp=2 parallel.zero_stage=0" "parallel.pp=2 parallel.zero_stage=1 train.grad_accum=2"; do
    run 2 configs/tiny.yaml "$layout" $data
  done
done
run 2 configs/tiny.yaml "parallel.zero_stage=0" raw optim.name=muon
run 2 configs/tiny.yaml "parallel.tp=2 parallel.zero_stage=0" features optim.name=muon
run 2 configs/tiny.yaml "parallel.zero_stage=3" raw optim.name=muon optim.muon.implementation=deepspeed optim.grad_clip=0 optim.muon.scaling=original
run 2 configs/tiny.yaml "parallel.zero_stage=1 parallel.checkpoint_mllm=true" builtin train.compile=true train.compile_backend=aot_eager
run 4 configs/tiny.yaml "parallel.tp=2 parallel.zero_stage=1" raw
run 4 configs/tiny.yaml "parallel.tp=2 parallel.pp=2 parallel.zero_stage=1 train.grad_accum=2" features
run 2 configs/tiny_s3dit.yaml "parallel.tp=2 parallel.zero_stage=0" raw
run 2 configs/tiny_s3dit.yaml "parallel.pp=2 parallel.zero_stage=1 train.grad_accum=2" features optim.name=adamw
run 2 configs/tiny_qwen_lora.yaml "model.lora=null parallel.zero_stage=3" raw
run 2 configs/tiny_qwen_lora.yaml "parallel.zero_stage=3" builtin
run 2 configs/tiny_qwen_lora.yaml "parallel.zero_stage=2" raw
exit $failed
