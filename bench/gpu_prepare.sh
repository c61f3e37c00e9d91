#!/usr/bin/env bash
# Here (no GPU needed): stage what the GPU checks need in .gpu/, which git ignores (via .git/info/exclude) and the
# device tool carries. Each device call carries at most 64 MiB with the working tree, so CIFAR-10 (186 MB) goes in
# three parts, one per call (bench/gpu_session.sh says which call carries which part).
#
#     bash bench/gpu_prepare.sh [CIFAR10_DIR]      # default: $LIGHTNING_ADAMW_SHARED_DATA/cifar10 or ../shared/data/cifar10
#
# Makes .gpu/wheels (the packages the device image lacks: jsonargparse and what LightningCLI's signatures need,
# pytorch-optimizer for lion / schedule-free AdamW) and .gpu/cifar_1, .gpu/cifar_2, .gpu/cifar_3.
set -euo pipefail
cd "$(dirname "$0")/.."

shared="${LIGHTNING_ADAMW_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
src="${1:-$shared/cifar10}/cifar-10-batches-py"
if [ ! -f "$src/data_batch_1" ]; then
  echo "No CIFAR-10 at $src (torchvision's cifar-10-batches-py layout); pass its parent folder." >&2
  exit 1
fi
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude

rm -rf .gpu && mkdir -p .gpu/wheels .gpu/cifar_1 .gpu/cifar_2 .gpu/cifar_3
# pure-Python wheels, for the device's Python 3.12; versions as in this project's environment
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 pytorch-optimizer==4.1.0
cp "$src/data_batch_1" "$src/data_batch_2" .gpu/cifar_1/
cp "$src/data_batch_3" "$src/data_batch_4" .gpu/cifar_2/
cp "$src/data_batch_5" "$src/test_batch" "$src/batches.meta" .gpu/cifar_3/
du -sh .gpu/* | sed 's/^/staged /'
