#!/usr/bin/env bash
# On the lent GPU machine, from the repository root: the GPU checks the issues name, in three calls that each carry
# one part of CIFAR-10 (staged here by bench/gpu_prepare.sh). Make the calls back to back: the machine stays warm
# for only 30 s after each, and the parts must land on the same machine.
#
#   call 1, carry [".gpu/wheels", ".gpu/cifar_1"]:  bash bench/gpu_session.sh 1   # plugin checks, step and QRNN timings
#   call 2, carry [".gpu/wheels", ".gpu/cifar_2"]:  bash bench/gpu_session.sh 2   # one epoch of AWD-LSTM and AWD-QRNN
#   call 3, carry [".gpu/wheels", ".gpu/cifar_3"]:  bash bench/gpu_session.sh 3   # cifar10_tta.yaml, bf16, under DDP
#   call 4 (if device time is left), same carry as 3: bash bench/gpu_session.sh 4 [EPOCHS, default 5]   # issue 6
#
# Extra arguments go to that step's main command (step 3: LightningCLI overrides; step 2: bench_lm_epoch.py).
# Every log also lands in $OUT, which the device tool brings back; runs and checkpoints stay in $GPU_WORK
# (default /tmp/lightning_adamw_gpu), so a rerun of a step that timed out resumes.
set -uo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: bash bench/gpu_session.sh 1|2|3|4 [extra arguments]}"
shift
OUT="${OUT:-/tmp/gpu_session_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .gpu/wheels/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
# outside the working tree, which the device tool re-syncs at each call (a warm machine is the same one each call)
work="${GPU_WORK:-/tmp/lightning_adamw_gpu}"
data="$work/cifar10"
mkdir -p "$data/cifar-10-batches-py"
if [ -d ".gpu/cifar_$step" ]; then cp .gpu/cifar_"$step"/* "$data/cifar-10-batches-py/"; fi

run() {  # run NAME SECONDS COMMAND...: time-limited, logged to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S)): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} ($(date -u +%H:%M:%S))"
}

results() {  # the comparison runner's table, results file and plots, into $OUT
  find "$1" -maxdepth 1 -type f \( -name '*.md' -o -name '*.json' -o -name '*.png' \) -exec cp {} "$OUT"/ \;
  cat "$1"/*.md 2>/dev/null
}

cifar_complete() {
  local missing=0
  for f in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch batches.meta; do
    [ -f "$data/cifar-10-batches-py/$f" ] || { echo "missing $f: the earlier calls' parts are not on this machine"; missing=1; }
  done
  return $missing
}

case "$step" in
  1)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" \
      | tee -a "$OUT/gpu.txt"
    run gpu_checks 150 python3 bench/gpu_checks.py
    run onecycle_step 90 python3 bench/bench_onecycle_step.py --device cuda
    run qrnn 150 python3 bench/bench_qrnn.py --device cuda --repeats 5
    ;;
  2)
    run lm_epoch 420 python3 bench/bench_lm_epoch.py "$@"
    ;;
  3)
    cifar_complete || exit 1
    # issue 3 (cifar10_tta.yaml to completion, then the test set with TTA) and issue 5 (one config on CUDA in bf16,
    # through DDP), by the comparison runner: its results.md has the accuracies and the wall time
    run cifar10_tta 570 python3 -m lightning_adamw compare --config configs/cifar10_tta.yaml --variants adamw \
      --seeds 1 --out "$work/cifar10_tta" --trainer.precision bf16-mixed --trainer.strategy ddp \
      --data.init_args.data_dir "$data" --data.init_args.download false "$@"
    results "$work/cifar10_tta"
    ;;
  4)
    cifar_complete || exit 1
    epochs="${1:-5}"
    shift || true
    run compare 570 python3 -m lightning_adamw compare --config configs/cifar10.yaml \
      --variants adamw,sgd,muon,schedulefree_adamw,lion --seeds 1 --out "$work/compare" \
      --trainer.precision bf16-mixed --trainer.max_epochs "$epochs" \
      --data.init_args.data_dir "$data" --data.init_args.download false "$@"
    results "$work/compare"
    ;;
  *)
    echo "unknown step $step: 1, 2, 3 or 4" >&2
    exit 2
    ;;
esac
