#!/usr/bin/env bash
# One device call on the GPU machine: `cim-run bench` for the four configurations of the
# performance page, then the PyTorch reference (../shared/bench/torch_cim_ref.py) on the same GPU.
# Expects .gpu/cim-run.xz (a `--features cudnn` release build), .gpu/run-on-gpu.sh and
# .gpu/torch_cim_ref.py (see book/src/performance.md). Writes JSON lines under $OUT (or ./bench-out).
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
B=${B:-128}; STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}
xz -dc .gpu/cim-run.xz > /tmp/cim-run && chmod +x /tmp/cim-run
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for p in vit_b16_respix vit_s16_respix vit_b16_revdet resnet50_revdet; do
  echo "== cim $p"
  RUST_LOG=warn timeout 150 bash .gpu/run-on-gpu.sh /tmp/cim-run bench --preset "$p" --batch "$B" \
    --steps "$STEPS" --warmup "$WARMUP" --device cuda:0 > "$OUT/cim_$p.json" 2> "$OUT/cim_$p.err"
  echo "rc=$?"; tail -c 600 "$OUT/cim_$p.json"; tail -n 5 "$OUT/cim_$p.err"
done
echo "== torch bf16 eager suite"
timeout 180 python3 .gpu/torch_cim_ref.py --suite --device cuda --dtype bf16 --batch "$B" \
  --steps 20 --warmup 5 --no-flops > "$OUT/torch_bf16.jsonl" 2> "$OUT/torch_bf16.err"
echo "rc=$?"; cut -c1-400 "$OUT/torch_bf16.jsonl"
echo "== torch fp32 (tf32) eager ViT-B/16 RESPIX"
timeout 90 python3 .gpu/torch_cim_ref.py --device cuda --dtype fp32 --tf32 --enhancer vit_b16 \
  --objective respix --batch "$B" --steps 10 --warmup 3 --no-flops > "$OUT/torch_fp32.jsonl" 2> "$OUT/torch_fp32.err"
echo "rc=$?"; cut -c1-400 "$OUT/torch_fp32.jsonl"
