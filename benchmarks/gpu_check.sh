#!/usr/bin/env bash
# One prepared GPU check for a CUDA machine without network (issue 7).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT or ./gpu_results
#
# Uses only what is installed there (torch, triton, transformers; NOT diffusers or deepspeed)
# plus wheels carried in ./.whl/ if present (installed with --no-index --no-deps into /tmp/site;
# `bash benchmarks/prepare_gpu_wheels.sh` fetches them on a machine with the package index).
# Stages (each one's failure is recorded, none stops the others; total < 8 min on an H100):
#   0 preflight      python / torch / device / which optional modules import
#   1 pytest -m gpu  every CUDA test of the repository (tests/profiling/test_gpu.py among them)
#   2 blocks         IOMM-B FLUX double + single block (hidden 1536, 1024 + 256 tokens), bf16,
#                    fwd + bwd, SDPA and (when importable) flash-attn: ms, TFLOP/s, MFU
#   2a kernels       the same blocks under torch.profiler, eager and compiled: kernel time by
#                    category (matmul / attention / norm / other) and the top kernels (bench_kernels.py)
#   2c genkernels   the whole IOMM-B generator's fwd + bwd (micro-batch 32, compiled blocks, fp32 + autocast)
#                    by kernel: idle share, categories, top kernels and aten ops, per formulation variant
#                    (benchmarks/bench_generator_kernels.py; GPU_CHECK_GENK_MB, GPU_CHECK_GENK_VARIANTS;
#                    GPU_CHECK_GENK_CONFIG=configs/xl.yaml GPU_CHECK_GENK_MB=4 (H200; 2 on an H100): IOMM-XL's S3-DiT)
#   2d normrope     the fused q/k RMSNorm + RoPE Triton kernel: its CUDA correctness check and its speed
#                    against eager / inductor code (benchmarks/bench_norm_rope.py); the sweep's fastest
#                    rows x warps per program (checked again) then runs the later stages via
#                    IOMM_NORM_ROPE_CONFIG (GPU_CHECK_NORMROPE_TUNED=0: keep the shipped one)
#   2b muon          issue 6: IOMM-XL generator (8 of 34 S3-DiT blocks at real shapes, micro-batch 16,
#                    1024 + 256 tokens, fp32 weights + bf16 autocast): fwd + bwd vs MuonWithAdamW.step()
#                    (bf16 Newton-Schulz) and fused AdamW, ratios vs the <= 3% goal, Newton-Schulz per
#                    owner rank (1/2/4/8/32) as DistributedMuon assigns it (benchmarks/bench_muon_gpu.py)
#   3 generator      whole IOMM-B generator step (DiT fwd + bwd + AdamW), bf16 autocast,
#                    micro-batch 4 / 8 / 16 x checkpointing none / full x attention backends
#   4 iomm step      the full IOMM-B step (random-weight InternVL3-2B at its real size, feature
#                    batches: RQA + frozen LLM fwd/bwd + DiT), micro-batch 8, checkpointing full,
#                    compile off / on (generator blocks) / all (+ the frozen LLM's decoder layers)
#   5 compile        generator step with torch.compile per block, micro-batch 8 / 16 x none / full,
#                    parameters fp32 (+ bf16 autocast) and bf16 (+ fp32 master: DeepSpeed's bf16 mode);
#                    fbMFU = forward + backward alone (the issue's goal), MFU = the whole step
#   6 data           issue 4's data benchmark (benchmarks/bench_data.py: bare PIL vs our raw loader vs
#                    feature shards, per CPU core) on this host's server CPU, a second machine beside
#                    the development VM (needs the carried webdataset / simplejpeg wheels)
#   7 zero_cpu       issue 5's CPU time goal on this host's quiet server cores (GPU hidden): activation
#                    checkpointing full vs none in the DeepSpeed ZeRO-3 training step with 1 / 2 / 4
#                    processes, one thread each (bench_zero_memory.py part C; GPU_CHECK_ZERO_PARTS=isolated,c
#                    adds part B process-isolated; needs the carried deepspeed / megatron-core / pydantic wheels)
# GPU_CHECK_PYTEST_PATHS narrows stage 1 to some test files (default: tests/), GPU_CHECK_PYTEST_K to a
# pytest -k expression (e.g. "not s3dit and not qwen": each compiled block test costs two inductor compiles).
# Sizes: GPU_CHECK_STEP_MB / _STEP_CKPT / _STEP_COMPILE (stage 4), GPU_CHECK_COMPILE_MB / _COMPILE_CKPT /
# _COMPILE_PARAMS (stage 5), GPU_CHECK_ZERO_PAIRS / _ZERO_WORLDS / _ZERO_PARTS (stage 7).
# GPU_CHECK_STAGES=preflight,pytest_gpu,...: run only the named stages (the others are listed as not selected).
# Results: $OUT/RESULTS.md (stage table + every table), CSVs and logs beside it.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-460}   # stop starting new stages after this many seconds
SUMMARY="$OUT/stages.tsv"
: > "$SUMMARY"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# the data loader's optional C helper (iomm_scale/data/_native.c): the tree runs from
# PYTHONPATH, not pip-installed, so build it in place (no network needed); else the fallbacks
if $PY setup.py -q build_ext --inplace >"$OUT/native_build.log" 2>&1; then echo "native helper: built"
else echo "native helper: not built, Python fallbacks (see native_build.log)"; fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }

# run_stage NAME TIMEOUT_S CMD...: runs CMD with a timeout, logs to $OUT/NAME.log, records rc.
run_stage() {
  local name=$1 limit=$2; shift 2
  if [[ -n ${GPU_CHECK_STAGES:-} && ",$GPU_CHECK_STAGES," != *",$name,"* ]]; then
    printf '%s\tnot selected\t0\tGPU_CHECK_STAGES=%s\n' "$name" "$GPU_CHECK_STAGES" >> "$SUMMARY"; return 0
  fi
  local left=$(( BUDGET - $(elapsed) ))
  if (( left < 30 )); then
    printf '%s\tskipped\t0\tno time left (%ss used)\n' "$name" "$(elapsed)" >> "$SUMMARY"; return 0
  fi
  (( limit > left )) && limit=$left
  local t0=$(date +%s)
  echo "=== stage $name (limit ${limit}s) ===" | tee "$OUT/$name.log"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local note; note=$(tail -n 3 "$OUT/$name.log" | tr '\t\n' '  ' | cut -c1-200)
  [[ $rc == 124 || $rc == 137 ]] && note="TIMED OUT after ${limit}s; $note"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$note" >> "$SUMMARY"
  echo "=== stage $name: rc=$rc in ${dt}s ==="
  return 0
}

# GPU_CHECK_DRY_RUN=1: the same stages on CPU at toy sizes (checks this script's plumbing, not the GPU)
DRY=${GPU_CHECK_DRY_RUN:-0}
B_CFG=configs/b.yaml; MBS=4,8,16; MB=8; BLOCKS=(--gpu-blocks); STEPS=5
if [[ $DRY == 1 ]]; then
  B_CFG=configs/tiny.yaml; MBS=2; MB=2; BLOCKS=(--gpu-blocks --dry-run); STEPS=1
fi

# ---- 0: preflight -------------------------------------------------------------------------
run_stage preflight 60 $PY - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    from iomm_scale.profiling.mfu import lookup_peak
    print("dense bf16 peak (table)", lookup_peak(torch.cuda.get_device_name()))
for m in ("triton", "transformers", "yaml", "tokenizers", "safetensors", "numpy", "PIL", "skimage", "webdataset",
          "pytest", "flash_attn", "flash_attn_interface", "diffusers", "deepspeed", "peft"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:<22s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"  {m:<22s} MISSING ({type(e).__name__})")
EOF

# ---- 1: the CUDA tests --------------------------------------------------------------------
if $PY -c "import pytest" >/dev/null 2>&1; then
  PK=(); [[ -n ${GPU_CHECK_PYTEST_K:-} ]] && PK=(-k "$GPU_CHECK_PYTEST_K")
  run_stage pytest_gpu 200 $PY -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
      -o addopts="" "${PK[@]}" ${GPU_CHECK_PYTEST_PATHS:-tests/} -rs
else
  printf 'pytest_gpu\tskipped\t0\tpytest is not installed (carry pytest, pluggy, iniconfig in .whl/)\n' >> "$SUMMARY"
fi

# ---- 2: IOMM-B blocks, bf16, SDPA / flash -------------------------------------------------
run_stage blocks 120 $PY benchmarks/bench_throughput.py "${BLOCKS[@]}" --out "$OUT"

# ---- 2a: where a block's time goes, by kernel category, eager vs compiled --------------------
KERN=(); [[ $DRY == 1 ]] && KERN=(--dry-run)
run_stage kernels 120 $PY benchmarks/bench_kernels.py ${KERN[@]+"${KERN[@]}"} --out "$OUT"

# ---- 2d: the fused q/k RMSNorm + RoPE kernel: correctness (both pair modes) and speed vs inductor ----
if [[ $DRY != 1 ]]; then
  # the sweep runs even when the check fails (a failing check still fails the stage): its timings
  # stand on their own, and a configuration is only adopted after its own check below
  run_stage normrope 180 bash -c "$PY tests/models/_fused_norm_rope_check.py cuda; c=\$?; \
      $PY benchmarks/bench_norm_rope.py --sweep --out '$OUT'; s=\$?; exit \$(( c ? c : s ))"
  # The sweep's fastest forward / backward configuration, checked for correctness on the card,
  # then used by the later stages (GPU_CHECK_NORMROPE_TUNED=0, or a preset IOMM_NORM_ROPE_CONFIG,
  # keeps what is set); bench_generator_kernels' variant `shipped` times the built-in one beside it.
  if [[ -f "$OUT/normrope_best.env" && ${GPU_CHECK_NORMROPE_TUNED:-1} == 1 && -z ${IOMM_NORM_ROPE_CONFIG:-} ]]; then
    BEST=$(sed -n 's/^IOMM_NORM_ROPE_CONFIG=//p' "$OUT/normrope_best.env")
    if IOMM_NORM_ROPE_CONFIG=$BEST $PY tests/models/_fused_norm_rope_check.py cuda >> "$OUT/normrope.log" 2>&1; then
      export IOMM_NORM_ROPE_CONFIG=$BEST
      echo "norm+rope kernel configuration for the later stages: $BEST" | tee -a "$OUT/normrope.log"
    else
      echo "the sweep's fastest configuration $BEST FAILED the correctness check: not used" | tee -a "$OUT/normrope.log"
    fi
  fi
fi

# ---- 2c: the whole generator's forward + backward by kernel, and formulation variants ---------
# default variants: with a tuned norm + RoPE configuration also the built-in one (`shipped`) beside it
GK_DEFAULT=base,unfused; [[ -n ${IOMM_NORM_ROPE_CONFIG:-} ]] && GK_DEFAULT=base,shipped,unfused
GK=(--config ${GPU_CHECK_GENK_CONFIG:-configs/b.yaml} --micro-batch ${GPU_CHECK_GENK_MB:-32} --variants ${GPU_CHECK_GENK_VARIANTS:-$GK_DEFAULT}); [[ $DRY == 1 ]] && GK=(--dry-run --variants base)
run_stage genkernels 300 $PY benchmarks/bench_generator_kernels.py "${GK[@]}" --out "$OUT"

# ---- 2b: Muon step vs forward + backward at IOMM-XL shapes (issue 6) ---------------------------
MUON=(); [[ $DRY == 1 ]] && MUON=(--device cpu --dry-run)
run_stage muon 90 $PY benchmarks/bench_muon_gpu.py ${MUON[@]+"${MUON[@]}"} --out "$OUT"

# ---- 3: IOMM-B generator step -------------------------------------------------------------
ATTN=sdpa
$PY -c "from iomm_scale.models.attention import flash_available as f; raise SystemExit(0 if f() else 1)" \
    >/dev/null 2>&1 && ATTN=sdpa,flash
# b.yaml reads webdataset shards; the profile builds synthetic batches, so the data section is neutralised
B_OVER=(data.source=builtin data.webdataset=null)
run_stage generator 170 $PY -m iomm_scale.profiling.profile --config $B_CFG "${B_OVER[@]}" \
    --scope generator --micro-batch $MBS --checkpointing none,full --attention "$ATTN" --steps $STEPS --warmup 2 \
    --csv "$OUT/generator_step.csv"

# ---- 4: the full IOMM-B step with a random-weight InternVL3-2B ------------------------------
RF=(--random-frozen); [[ $DRY == 1 ]] && RF=()
SMB=${GPU_CHECK_STEP_MB:-$MB}; SCK=${GPU_CHECK_STEP_CKPT:-full}; COMPILE=${GPU_CHECK_STEP_COMPILE:-off,on,all}
[[ $DRY == 1 ]] && COMPILE=off
run_stage iomm_step 200 $PY -m iomm_scale.profiling.profile --config $B_CFG "${B_OVER[@]}" \
    ${RF[@]+"${RF[@]}"} --micro-batch $SMB --checkpointing $SCK --attention sdpa --compile $COMPILE --steps $STEPS --warmup 3 \
    --csv "$OUT/iomm_step.csv"

# ---- 5: torch.compile ------------------------------------------------------------------------
COMPILE=on; CMBS=${GPU_CHECK_COMPILE_MB:-8,16}; CCK=${GPU_CHECK_COMPILE_CKPT:-none,full}
CPA=${GPU_CHECK_COMPILE_PARAMS:-fp32,bf16}
[[ $DRY == 1 ]] && { COMPILE=off; CMBS=2; }
run_stage compile 200 $PY -m iomm_scale.profiling.profile --config $B_CFG "${B_OVER[@]}" \
    --scope generator --micro-batch $CMBS --checkpointing $CCK --attention sdpa --compile $COMPILE --params $CPA \
    --steps $STEPS --warmup 3 --no-plan --csv "$OUT/compile.csv"

# ---- 6: the data pipeline per CPU core on this host (issue 4) ----------------------------------
DROUNDS=5; [[ $DRY == 1 ]] && DROUNDS=1
DARGS=(--rounds $DROUNDS); [[ $DRY == 1 ]] && DARGS+=(--images 8 --features 64 --repeat 1)
run_stage data 120 $PY benchmarks/bench_data.py "${DARGS[@]}"

# ---- 7: activation checkpointing's step-time cost on this host's CPU cores (issue 5) -------------
ZPAIRS=${GPU_CHECK_ZERO_PAIRS:-2}; ZWORLDS=${GPU_CHECK_ZERO_WORLDS:-1,2,4}; ZPARTS=${GPU_CHECK_ZERO_PARTS:-c}
ZSTEPS=6; [[ $DRY == 1 ]] && { ZPAIRS=1; ZWORLDS=1; ZSTEPS=1; }
run_stage zero_cpu 300 env CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu DS_BUILD_OPS=0 $PY benchmarks/bench_zero_memory.py \
    --parts $ZPARTS --isolated $ZPAIRS --zero-time $ZPAIRS --zero-time-worlds $ZWORLDS --zero-time-steps $ZSTEPS

# ---- report ------------------------------------------------------------------------------------
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ), $(elapsed) s"
  echo
  grep -E "^(python|torch|device|dense)" "$OUT/preflight.log" 2>/dev/null | sed 's/^/    /'
  echo
  echo "| stage | rc | seconds | last lines |"
  echo "|---|---|---|---|"
  while IFS=$'\t' read -r name rc dt note; do echo "| $name | $rc | $dt | ${note//|//} |"; done < "$SUMMARY"
  echo
  [[ -f "$OUT/blocks.md" ]] && { echo "## Blocks"; echo; cat "$OUT/blocks.md"; echo; }
  [[ -f "$OUT/kernels.md" ]] && { echo "## Kernels"; echo; cat "$OUT/kernels.md"; echo; }
  [[ -f "$OUT/normrope.md" ]] && { echo "## q/k norm + RoPE"; echo; cat "$OUT/normrope.md"; echo; }
  [[ -f "$OUT/genkernels.md" ]] && { echo "## Generator kernels"; echo; cat "$OUT/genkernels.md"; echo; }
  [[ -f "$OUT/muon.md" ]] && { echo "## Muon (IOMM-XL)"; echo; cat "$OUT/muon.md"; echo; }
  for s in generator iomm_step compile; do
    if [[ -f "$OUT/$s.log" ]]; then
      echo "## $s"; echo; echo '```'
      grep -E "^(iomm-profile|scope|generator|step) " "$OUT/$s.log" || tail -n 5 "$OUT/$s.log"
      echo '```'; echo
    fi
  done
  if [[ -f "$OUT/data.log" ]]; then
    echo "## data (per CPU core)"; echo; grep -E "^(machine|resolution|per-round|\||[0-9]+x[0-9]+:|  )" "$OUT/data.log"; echo
  fi
  if [[ -f "$OUT/zero_cpu.log" ]]; then
    echo "## zero_cpu (issue 5, CPU cores of this host)"; echo; grep -vE "^=== " "$OUT/zero_cpu.log" | tail -n 30; echo
  fi
  if [[ -f "$OUT/pytest_gpu.log" ]]; then
    echo "## pytest -m gpu"; echo; echo '```'; tail -n 25 "$OUT/pytest_gpu.log"; echo '```'
  fi
} > "$OUT/RESULTS.md"
echo "results: $OUT/RESULTS.md ($(elapsed) s)"
cat "$OUT/RESULTS.md"
