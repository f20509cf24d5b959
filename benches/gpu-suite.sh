#!/usr/bin/env bash
# One device call on the GPU machine (see book/src/performance.md), carry [".gpu"]:
#   1. the GPU parity test of the CUDA kernels (CPU kernel vs CUDA kernel, values and gradients);
#   2. `cim-run bench` for the four configurations of the performance page at batch $B, all in
#      bf16 (ResNet-50 since session 9; also once more in f32/TF32, session 6's setting), fused
#      CUDA kernels on; ViT-B/16 RESPIX again with
#      `run.fused_blocks = false` (blocks recorded op by op) for the block node's effect, and with
#      cim's cuDNN convolution (`run.cudnn_conv`), alone and with the dVAE decoder in bf16
#      (`tokenizer.dalle_dvae.decoder_precision`; its pixel distance from the f32 decoder is in
#      the tok_precision line); ResNet-50 bf16 with `run.cudnn_conv` too;
#   3. the PyTorch reference (../shared/bench/torch_cim_ref.py), bf16 eager suite, then
#      torch.compile for ViT-B/16 RESPIX;
#   4. kernel-level profiles of ViT-B/16 RESPIX (benches/cupti): as in 2, and with cim's cuDNN
#      calls and the whole dVAE in bf16; the fused-op bench.
# Expects in .gpu/: cim-run.xz (`--features cudnn`), ops_cuda.xz (`--features cudnn` test binary
# of cim-api) and fused_ops.xz (`--features cuda` bench binary), libkernel_times.so (benches/cupti/README.md),
# run-on-gpu.sh and torch_cim_ref.py from ../shared. Prints a summary; files go under $OUT.
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
B=${B:-128}; STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}
RUN="bash .gpu/run-on-gpu.sh"; T0=$(date +%s)
el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
summ() { python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    d = json.loads(line)
    if "images_per_s" in d:
        ph = {k: round(v, 1) for k, v in d["phase_ms"].items()}
        tok = (d.get("tok_precision") or {}).get("dtype", "-")
        print(f'  {d.get("enhancer")} {d.get("objective")} {d.get("dtype")} compile={d.get("compile", "-")} '
              f'cudnn_conv={d.get("cudnn_conv", "-")} dvae={tok}: '
              f'{d["images_per_s"]:.1f} img/s, step {d["step_ms"]:.1f} ms, peak {d.get("peak_mem_gib", 0):.1f} GiB {ph}')
PY
}

el "GPU parity of the CUDA kernels"
timeout 120 $RUN .gpu/ops_cuda.xz --test-threads 1 --nocapture > "$OUT/ops_cuda.txt" 2>&1
echo "rc=$?"; grep -E "^(ok|FAIL) |test result|panicked" "$OUT/ops_cuda.txt" | head -n 40

# The device tool returns at most 8 files: every cim bench line goes to $OUT/cim.jsonl, each after a
# {"run": NAME} line.
bench() { # NAME PRESET [--set ...]
  local name=$1 preset=$2; shift 2
  el "cim $name"
  local j="$OUT/cim_now.json"
  RUST_LOG=info timeout 150 $RUN .gpu/cim-run.xz bench --preset "$preset" --batch "$B" \
    --steps "$STEPS" --warmup "$WARMUP" --device cuda:0 "$@" > "$j" 2> "$OUT/cim.err"
  local rc=$?; echo "rc=$rc"; summ "$j"; grep -oE '"tok_precision":\{[^{}]*(\{[^{}]*\})?[^{}]*\}' "$j"
  grep -v " INFO " "$OUT/cim.err" | tail -n 3 | cut -c1-300
  if [[ $rc != 0 && "$*" == *cuda_kernels=true* ]]; then # measure the kernels-off path instead
    el "cim $name, kernels off (the run above failed)"
    RUST_LOG=info timeout 150 $RUN .gpu/cim-run.xz bench --preset "$preset" --batch "$B" --steps "$STEPS" \
      --warmup "$WARMUP" --device cuda:0 "${@/cuda_kernels=true/cuda_kernels=false}" > "$j" 2> "$OUT/cim.err"
    echo "rc=$?"; summ "$j"; grep -v " INFO " "$OUT/cim.err" | tail -n 3 | cut -c1-300
  fi
  { echo "{\"run\": \"$name\"}"; grep '^{' "$j"; } >> "$OUT/cim.jsonl"; rm -f "$j"
}
FAST=(--set run.precision='"bf16"' --set run.cuda_kernels=true)
bench vit_b16_respix vit_b16_respix "${FAST[@]}"

el "torch bf16 eager suite"
timeout 120 python3 .gpu/torch_cim_ref.py --suite --device cuda --dtype bf16 --batch "$B" \
  --steps 20 --warmup 5 --no-flops > "$OUT/torch.jsonl" 2> "$OUT/torch.err"
echo "rc=$?"; summ "$OUT/torch.jsonl"

# The same configuration with every transformer block recorded op by op (session 6's path).
bench vit_b16_respix_recorded vit_b16_respix "${FAST[@]}" --set run.fused_blocks=false
# cim's cuDNN forward convolution (session 10; tensor-core bf16): with the f32 dVAE, and with its
# decoder in bf16 (its pixel distance from the f32 decoder is in the tok_precision line).
bench vit_b16_respix_cudnn vit_b16_respix "${FAST[@]}" --set run.cudnn_conv=true
bench vit_b16_respix_cudnn_dec_bf16 vit_b16_respix "${FAST[@]}" --set run.cudnn_conv=true \
  --set tokenizer.dalle_dvae.decoder_precision='"bf16"'
# The whole dVAE in bf16, as the reference runs it under autocast (its token agreement with f32,
# below the 0.99 that "auto" asks for with random weights, is in the tok_precision line).
bench vit_b16_respix_cudnn_dvae_bf16 vit_b16_respix "${FAST[@]}" --set run.cudnn_conv=true \
  --set tokenizer.dalle_dvae.precision='"bf16"'
bench vit_s16_respix vit_s16_respix "${FAST[@]}"
bench vit_b16_revdet vit_b16_revdet "${FAST[@]}"
bench resnet50_revdet resnet50_revdet "${FAST[@]}"
bench resnet50_revdet_cudnn resnet50_revdet "${FAST[@]}" --set run.cudnn_conv=true
bench resnet50_revdet_f32 resnet50_revdet --set run.cuda_kernels=true

el "torch bf16 torch.compile ViT-B/16 RESPIX"
timeout 150 python3 .gpu/torch_cim_ref.py --device cuda --dtype bf16 --compile --enhancer vit_b16 \
  --objective respix --batch "$B" --steps 20 --warmup 5 --no-flops > "$OUT/torch_compile.jsonl" 2> "$OUT/torch.err"
echo "rc=$?"; summ "$OUT/torch_compile.jsonl"; cat "$OUT/torch_compile.jsonl" >> "$OUT/torch.jsonl"
rm -f "$OUT/torch_compile.jsonl" "$OUT/torch.err" "$OUT/cim.err"

el "kernel profile, ViT-B/16 RESPIX bf16"
TOP=45 timeout 120 bash benches/cupti/profile.sh vit_b16_respix 1 3 --batch "$B" --warmup 1 "${FAST[@]}" \
  > "$OUT/profile.txt" 2>&1; echo "rc=$?"; head -n 32 "$OUT/profile.txt"
rm -f "$OUT"/prof_* "$OUT"/prof.err

el "kernel profile, ViT-B/16 RESPIX bf16 with cim's cuDNN calls and the dVAE in bf16"
TOP=45 timeout 120 bash benches/cupti/profile.sh vit_b16_respix 1 3 --batch "$B" --warmup 1 "${FAST[@]}" \
  --set run.cudnn_conv=true --set tokenizer.dalle_dvae.precision='"bf16"' \
  > "$OUT/profile_cudnn_dvae_bf16.txt" 2>&1; echo "rc=$?"; head -n 32 "$OUT/profile_cudnn_dvae_bf16.txt"
rm -f "$OUT"/prof_* "$OUT"/prof.err

el "fused vs composed ops on CUDA"
timeout 60 $RUN .gpu/fused_ops.xz --bench > "$OUT/fused_ops.txt" 2>&1
echo "rc=$?"; tail -n 14 "$OUT/fused_ops.txt"
el done
