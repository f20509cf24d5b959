#!/usr/bin/env bash
# One device call on the GPU machine (see book/src/performance.md):
#   1. the GPU parity test of the fused kernels (CPU kernel vs CUDA kernel, values and gradients);
#   2. the fused-vs-composed op bench on CUDA;
#   3. `cim-run bench` for the four configurations of the performance page at batch $B, ViTs in bf16
#      with the fused CUDA kernels, ResNet-50 in f32 (not bf16-capable yet), plus ViT-B/16 RESPIX in
#      f32 with the kernels off (the session-2 configuration, for comparison);
#   4. the PyTorch reference (../shared/bench/torch_cim_ref.py): bf16 eager suite, then
#      torch.compile for ViT-B/16 RESPIX.
# Expects in .gpu/ (built here, carried with `carry: [".gpu"]`): cim-run.xz (`--features cudnn`),
# ops_cuda.xz and fused_ops.xz (`--features cuda` test/bench binaries of cim-api), run-on-gpu.sh and
# torch_cim_ref.py from ../shared. Writes everything under $OUT (or ./bench-out).
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
B=${B:-128}; STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}
RUN="bash .gpu/run-on-gpu.sh"

echo "== GPU parity of the fused kernels"
timeout 120 $RUN .gpu/ops_cuda.xz --test-threads 1 > "$OUT/ops_cuda.txt" 2>&1
echo "rc=$?"; tail -n 15 "$OUT/ops_cuda.txt"

echo "== fused vs composed ops on CUDA"
timeout 120 $RUN .gpu/fused_ops.xz --bench > "$OUT/fused_ops.txt" 2>&1
echo "rc=$?"; tail -n 8 "$OUT/fused_ops.txt"

bench() { # NAME PRESET [--set ...]
  local name=$1 preset=$2; shift 2
  echo "== cim $name"
  RUST_LOG=info timeout 150 $RUN .gpu/cim-run.xz bench --preset "$preset" --batch "$B" \
    --steps "$STEPS" --warmup "$WARMUP" --device cuda:0 "$@" > "$OUT/cim_$name.json" 2> "$OUT/cim_$name.err"
  echo "rc=$?"; tail -c 900 "$OUT/cim_$name.json"; grep -h "precision" "$OUT/cim_$name.err" | tail -n 3
  tail -n 3 "$OUT/cim_$name.err"
}
FAST=(--set run.precision='"bf16"' --set run.cuda_kernels=true)
bench vit_b16_respix_bf16_fused vit_b16_respix "${FAST[@]}"
bench vit_s16_respix_bf16_fused vit_s16_respix "${FAST[@]}"
bench vit_b16_revdet_bf16_fused vit_b16_revdet "${FAST[@]}"
bench resnet50_revdet_f32_fused resnet50_revdet --set run.cuda_kernels=true
bench vit_b16_respix_f32_composed vit_b16_respix

echo "== torch bf16 eager suite"
timeout 180 python3 .gpu/torch_cim_ref.py --suite --device cuda --dtype bf16 --batch "$B" \
  --steps 20 --warmup 5 --no-flops > "$OUT/torch_bf16.jsonl" 2> "$OUT/torch_bf16.err"
echo "rc=$?"; cut -c1-400 "$OUT/torch_bf16.jsonl"
echo "== torch bf16 torch.compile ViT-B/16 RESPIX"
timeout 150 python3 .gpu/torch_cim_ref.py --device cuda --dtype bf16 --compile --enhancer vit_b16 \
  --objective respix --batch "$B" --steps 20 --warmup 5 --no-flops > "$OUT/torch_compile.jsonl" 2> "$OUT/torch_compile.err"
echo "rc=$?"; cut -c1-400 "$OUT/torch_compile.jsonl"
