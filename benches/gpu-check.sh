#!/usr/bin/env bash
# A short device call (~2 min on a warm H200; carry [".gpu"]) for a session with little device time
# left: the GPU parity test, ViT-B/16 RESPIX bf16 as configured by default, the PyTorch eager
# reference of the same configuration in the same call, and kernel profiles (by kernel and by
# phase of the step) of it and of ResNet-50 REVDET.
# The full measurement is benches/gpu-suite.sh. Files go under $OUT.
set -u
source benches/gpu-lib.sh
parity
bench vit_b16_respix vit_b16_respix --set run.precision='"bf16"'
# The dVAE channels first (the layout before session 12) and the parameters packed into the block
# nodes (no GradSink: the path before session 12), for the two changes' effects.
bench vit_b16_respix_nchw vit_b16_respix --set run.precision='"bf16"' \
  --set tokenizer.dalle_dvae.layout='"nchw"'
bench vit_b16_respix_no_sink vit_b16_respix --set run.precision='"bf16"' --set run.grad_sink=false
el "torch bf16 eager ViT-B/16 RESPIX"
timeout 90 python3 .gpu/torch_cim_ref.py --device cuda --dtype bf16 --enhancer vit_b16 --objective respix \
  --batch "$B" --steps 10 --warmup 3 --no-flops > "$OUT/torch.jsonl" 2> "$OUT/torch.err"
echo "rc=$?"; summ "$OUT/torch.jsonl"; tail -n 3 "$OUT/torch.err"; rm -f "$OUT/torch.err" "$OUT/cim.err"
el "kernel profile, ViT-B/16 RESPIX bf16 (defaults), by kernel and by phase"
TOP=30 timeout 90 bash benches/cupti/profile.sh vit_b16_respix 1 3 --batch "$B" --warmup 1 \
  --set run.precision='"bf16"' > "$OUT/profile.txt" 2>&1; echo "rc=$?"; cat "$OUT/profile.txt"
el "kernel profile, ResNet-50 REVDET bf16 (defaults): never profiled before session 12's scripts"
TOP=30 timeout 120 bash benches/cupti/profile.sh resnet50_revdet 1 3 --batch "$B" --warmup 1 \
  --set run.precision='"bf16"' > "$OUT/profile_resnet.txt" 2>&1; echo "rc=$?"; cat "$OUT/profile_resnet.txt"
rm -f "$OUT"/prof_* "$OUT"/prof.err
el done
