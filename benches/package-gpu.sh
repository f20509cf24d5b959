#!/usr/bin/env bash
# Packs what benches/gpu-suite.sh needs into .gpu/ (git-ignored): the `cudnn` cim-run and ops_cuda
# test and the `cuda` fused_ops bench binaries from $CARGO_TARGET_DIR (build them first: book,
# Performance, "CUDA build"), the CUPTI profiler, the PyTorch reference ($REF) and the device
# runner script ($RUN_ON_GPU).
#   REF=.../torch_cim_ref.py RUN_ON_GPU=.../run-on-gpu.sh CUPTI_ROOT=<site-packages>/nvidia/cu13 \
#     CARGO_TARGET_DIR=... bash benches/package-gpu.sh
# CUPTI_ROOT: headers with CUpti_ActivityKernel11 (CUPTI ≥ 13.1, e.g. PyTorch's cu13 wheels).
set -euo pipefail
# kernel_times.c reads CUpti_ActivityKernel11 records, which the toolkit's CUPTI 13.0.85 headers
# lack; PyTorch's cu13 wheels carry newer ones (crt/ still comes from the toolkit's include, $C below).
if ! grep -q CUpti_ActivityKernel11 "${CUPTI_ROOT:-}/include/cupti_activity.h" 2>/dev/null; then
  echo "package-gpu.sh: ${CUPTI_ROOT:-(CUPTI_ROOT unset)}/include/cupti_activity.h lacks CUpti_ActivityKernel11;" \
    "point CUPTI_ROOT at a newer CUPTI, e.g. a torch venv's site-packages/nvidia/cu13" >&2
  exit 1
fi
T=${CARGO_TARGET_DIR:-target}/release
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
newest() { ls -t $1 2>/dev/null | grep -v '\.d$' | head -n 1; }
xz -T2 -6 -c "$T/cim-run" > .gpu/cim-run.xz
xz -T2 -6 -c "$(newest "$T/deps/ops_cuda-*")" > .gpu/ops_cuda.xz
xz -T2 -6 -c "$(newest "$T/deps/fused_ops-*")" > .gpu/fused_ops.xz
C=${CUDA_CRT_INCLUDE:-$HOME/.cache/cim-cuda/venv/lib/python3.11/site-packages/nvidia/cu13/include}
gcc -shared -fPIC -O2 -Wall -I"$CUPTI_ROOT/include" -I"$C" benches/cupti/kernel_times.c \
  -L"$CUPTI_ROOT/lib" -l:libcupti.so.13 -o .gpu/libkernel_times.so
cp "${RUN_ON_GPU:?set RUN_ON_GPU to the device runner script}" \
  "${REF:?set REF to the PyTorch reference torch_cim_ref.py}" .gpu/
ls -la .gpu
