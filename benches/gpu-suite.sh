#!/usr/bin/env bash
# One device call on the GPU machine (see book/src/performance.md), carry [".gpu"]:
#   1. the GPU parity test of the CUDA kernels (CPU kernel vs CUDA kernel, values and gradients);
#   2. `cim-run bench` for the four configurations of the performance page at batch $B, all in
#      bf16 (ResNet-50 also once more in f32/TF32), fused
#      CUDA kernels on; ViT-B/16 RESPIX again with
#      `run.fused_blocks = false` (blocks recorded op by op) for the block node's effect, and with
#      cim's cuDNN convolution (`run.cudnn_conv`), alone and with the dVAE decoder in bf16
#      (`tokenizer.dalle_dvae.decoder_precision`; its pixel distance from the f32 decoder is in
#      the tok_precision line), and with the dVAE channels first (`tokenizer.dalle_dvae.layout`);
#      every configuration with and without `run.cudnn_conv`;
#   3. the PyTorch reference (torch_cim_ref.py, packed into .gpu/), bf16 eager suite, then
#      torch.compile for ViT-B/16 RESPIX (COMPILE=0 skips it: ~100 s of compiling);
#   4. kernel-level profiles of ViT-B/16 RESPIX (benches/cupti): as in 2, without and with cim's
#      cuDNN convolution; the fused-op bench.
# Expects in .gpu/: cim-run.xz (`--features cudnn`), ops_cuda.xz (`--features cudnn` test binary
# of cim-ops) and fused_ops.xz (`--features cuda` bench binary), libkernel_times.so (benches/cupti/README.md),
# run-on-gpu.sh and torch_cim_ref.py (benches/package-gpu.sh). Prints a summary; files go under $OUT.
set -u
source benches/gpu-lib.sh
parity

# Every run names run.cudnn_conv, so the suite means the same whichever default the binary has.
FAST=(--set run.precision='"bf16"' --set run.cuda_kernels=true --set run.cuda_unverified=true --set run.cuda_keep_freed=true)
OFF=(--set run.cudnn_conv=false); ON=(--set run.cudnn_conv=true)
bench vit_b16_respix vit_b16_respix "${FAST[@]}" "${OFF[@]}"

el "torch bf16 eager suite"
timeout 120 python3 .gpu/torch_cim_ref.py --suite --device cuda --dtype bf16 --batch "$B" \
  --steps 20 --warmup 5 --no-flops > "$OUT/torch.jsonl" 2> "$OUT/torch.err"
echo "rc=$?"; summ "$OUT/torch.jsonl"

# The same configuration with every transformer block recorded op by op.
bench vit_b16_respix_recorded vit_b16_respix "${FAST[@]}" "${OFF[@]}" --set run.fused_blocks=false
# Plain `Tensor::backward` (the block nodes pack their parameters).
bench vit_b16_respix_no_sink vit_b16_respix "${FAST[@]}" "${OFF[@]}" --set run.grad_sink=false
# cim's cuDNN convolution (tensor cores, f32 accumulation): with the dVAE's "auto"
# precision (f16 where its tokens agree with f32's), and with its decoder in bf16 (its pixel
# distance from the f32 decoder is in the tok_precision line).
bench vit_b16_respix_cudnn vit_b16_respix "${FAST[@]}" "${ON[@]}"
# The dVAE channels first on cuDNN (channels last is its "auto" layout there).
bench vit_b16_respix_cudnn_nchw vit_b16_respix "${FAST[@]}" "${ON[@]}" \
  --set tokenizer.dalle_dvae.layout='"nchw"'
bench vit_b16_respix_cudnn_dec_bf16 vit_b16_respix "${FAST[@]}" "${ON[@]}" \
  --set tokenizer.dalle_dvae.decoder_precision='"bf16"'
# The whole dVAE in bf16, as the reference runs it under autocast (its token agreement with f32,
# below the 0.99 that "auto" asks for with random weights, is in the tok_precision line).
bench vit_b16_respix_cudnn_dvae_bf16 vit_b16_respix "${FAST[@]}" "${ON[@]}" \
  --set tokenizer.dalle_dvae.precision='"bf16"'
for p in vit_s16_respix vit_b16_revdet resnet50_revdet; do
  bench "$p" "$p" "${FAST[@]}" "${OFF[@]}"
  bench "${p}_cudnn" "$p" "${FAST[@]}" "${ON[@]}"
done
bench resnet50_revdet_f32 resnet50_revdet --set run.cuda_kernels=true "${OFF[@]}"

# torch.compile takes ~100 s to compile: COMPILE=0 skips it (for a short rerun).
[[ "${COMPILE:-1}" == 1 ]] && el "torch bf16 torch.compile ViT-B/16 RESPIX" && timeout 150 python3 .gpu/torch_cim_ref.py --device cuda --dtype bf16 --compile --enhancer vit_b16 \
  --objective respix --batch "$B" --steps 20 --warmup 5 --no-flops > "$OUT/torch_compile.jsonl" 2> "$OUT/torch.err"
[[ -s "$OUT/torch_compile.jsonl" ]] && { summ "$OUT/torch_compile.jsonl"; cat "$OUT/torch_compile.jsonl" >> "$OUT/torch.jsonl"; }
rm -f "$OUT/torch_compile.jsonl" "$OUT/torch.err" "$OUT/cim.err"

el "kernel profile, ViT-B/16 RESPIX bf16"
TOP=45 timeout 120 bash benches/cupti/profile.sh vit_b16_respix 1 3 --batch "$B" --warmup 1 "${FAST[@]}" "${OFF[@]}" \
  > "$OUT/profile.txt" 2>&1; echo "rc=$?"; head -n 32 "$OUT/profile.txt"
rm -f "$OUT"/prof_* "$OUT"/prof.err

el "kernel profile, ViT-B/16 RESPIX bf16 with cim's cuDNN convolution (dVAE precision auto)"
TOP=45 timeout 120 bash benches/cupti/profile.sh vit_b16_respix 1 3 --batch "$B" --warmup 1 "${FAST[@]}" \
  "${ON[@]}" > "$OUT/profile_cudnn.txt" 2>&1; echo "rc=$?"; head -n 32 "$OUT/profile_cudnn.txt"
rm -f "$OUT"/prof_* "$OUT"/prof.err

el "fused vs composed ops on CUDA"
timeout 60 $RUN .gpu/fused_ops.xz --bench > "$OUT/fused_ops.txt" 2>&1
echo "rc=$?"; tail -n 14 "$OUT/fused_ops.txt"
el done
