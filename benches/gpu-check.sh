#!/usr/bin/env bash
# A short device call (~7 min on a warm H200; carry [".gpu"], timeout ≥ 540 s), most important
# first, so that a call cut short still holds the headline ratio: the GPU parity test; ViT-B/16
# RESPIX bf16 as configured by default and the PyTorch eager reference right after it; then ViT-B/16
# with the paths not yet checked on a GPU on (`run.cuda_unverified`), the flash attention kernels,
# and each host-side and layout choice switched back in turn; ResNet-50 REVDET bf16 and its reference, channels first and without regions; kernel
# profiles (by kernel and by phase of the step) of both.
# The full measurement is benches/gpu-suite.sh. Files go under $OUT.
set -u
source benches/gpu-lib.sh
torch_ref() { # ENHANCER OBJECTIVE: the eager reference, appended to torch.jsonl
  el "torch bf16 eager $1 $2"
  timeout 90 python3 .gpu/torch_cim_ref.py --device cuda --dtype bf16 --enhancer "$1" --objective "$2" \
    --batch "$B" --steps 10 --warmup 3 --no-flops > "$OUT/torch_now.jsonl" 2> "$OUT/torch.err"
  echo "rc=$?"; tail -n 3 "$OUT/torch.err"; summ "$OUT/torch_now.jsonl"
  cat "$OUT/torch_now.jsonl" >> "$OUT/torch.jsonl"; rm -f "$OUT/torch_now.jsonl" "$OUT/torch.err"
}
parity
# `run.cuda_kernels=true` is the default; naming it lets gpu-lib's bench() rerun with the kernels
# off should this run fail, so that the call still yields a figure.
bench vit_b16_respix vit_b16_respix --set run.precision='"bf16"' --set run.cuda_kernels=true
torch_ref vit_b16 respix
# The paths written since the last GPU run (off on CUDA by default: run.cuda_unverified), and the
# flash attention kernels on top. The variants below run with them on.
U=(--set run.cuda_unverified=true --set run.cuda_keep_freed=true)
bench vit_b16_respix_unverified vit_b16_respix --set run.precision='"bf16"' "${U[@]}"
bench vit_b16_respix_flash vit_b16_respix --set run.precision='"bf16"' "${U[@]}" \
  --set run.flash_attention=true
# Host-side choices, each switched on its own: phases timed by a host sync at every boundary (the
# step then drains the queue five times), then also the pool handing freed memory back at every
# sync (CUDA's default); and candle's upload cache on (do the small dims/strides copies cost
# anything?).
bench vit_b16_respix_sync vit_b16_respix --set run.precision='"bf16"' "${U[@]}" --sync-phases
bench vit_b16_respix_sync_release vit_b16_respix --set run.precision='"bf16"' "${U[@]}" \
  --sync-phases --set run.cuda_keep_freed=false
bench vit_b16_respix_upload_cache vit_b16_respix --set run.precision='"bf16"' "${U[@]}" --upload-cache
# The dVAE channels first, and the parameters' gradients through candle's graph (no GradSink).
bench vit_b16_respix_nchw vit_b16_respix --set run.precision='"bf16"' "${U[@]}" \
  --set tokenizer.dalle_dvae.layout='"nchw"'
bench vit_b16_respix_no_sink vit_b16_respix --set run.precision='"bf16"' "${U[@]}" \
  --set run.grad_sink=false
# ResNet-50 REVDET: the BatchNorm graft and running-average kernel, the sink.
bench resnet50_revdet resnet50_revdet --set run.precision='"bf16"' --set run.cuda_kernels=true
torch_ref resnet50 revdet
# With the unchecked paths on; then the enhancer channels first (the reference trains it channels
# last), and its bottlenecks as separate nodes of candle's graph (no region).
bench resnet50_revdet_unverified resnet50_revdet --set run.precision='"bf16"' "${U[@]}"
bench resnet50_revdet_nchw resnet50_revdet --set run.precision='"bf16"' "${U[@]}" \
  --set enhancer.resnet50.layout='"nchw"'
bench resnet50_revdet_no_regions resnet50_revdet --set run.precision='"bf16"' "${U[@]}" \
  --set run.graft_regions=false
rm -f "$OUT/cim.err"
el "kernel profile, ViT-B/16 RESPIX bf16 (defaults), by kernel and by phase"
TOP=30 timeout 90 bash benches/cupti/profile.sh vit_b16_respix 1 3 --batch "$B" --warmup 1 \
  --set run.precision='"bf16"' > "$OUT/profile.txt" 2>&1; echo "rc=$?"; cat "$OUT/profile.txt"
el "kernel profile, ResNet-50 REVDET bf16 (defaults), by kernel and by phase"
TOP=30 timeout 120 bash benches/cupti/profile.sh resnet50_revdet 1 3 --batch "$B" --warmup 1 \
  --set run.precision='"bf16"' > "$OUT/profile_resnet.txt" 2>&1; echo "rc=$?"; cat "$OUT/profile_resnet.txt"
rm -f "$OUT"/prof_* "$OUT"/prof.err
el done
