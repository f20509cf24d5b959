#!/usr/bin/env bash
# Kernel-level profile of `cim-run bench` on the GPU machine (no nsys there): runs the bench twice,
# with S1 and S2 timed steps, under the CUPTI injection library, and prints the per-step difference
# by kernel, then by phase of the step (tok_encode … optim) and kernel. Usage (device call, carry
# [".gpu"]):
#   bash benches/cupti/profile.sh PRESET S1 S2 [cim-run bench args...]
set -u
preset=$1 s1=$2 s2=$3; shift 3
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
cupti=$(find /usr/local/cuda* /opt /usr/lib -name 'libcupti.so.13' 2>/dev/null | head -n 1)
[[ -n "$cupti" ]] || { echo "profile: libcupti.so.13 not found" >&2; exit 2; }
export LD_LIBRARY_PATH="$(dirname "$cupti")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_INJECTION64_PATH="$PWD/.gpu/libkernel_times.so"
for s in "$s1" "$s2"; do
  CIM_PHASE_MARKERS=1 KERNEL_TIMES_OUT="$OUT/prof_${preset}_$s.tsv" timeout 200 bash .gpu/run-on-gpu.sh .gpu/cim-run.xz bench \
    --preset "$preset" --steps "$s" --device cuda:0 --set tokenizer.dalle_dvae.weights='"random"' "$@" \
    > "$OUT/prof_${preset}_$s.json" 2> "$OUT/prof.err"
  echo "profile $preset steps=$s rc=$? $(grep -o '"step_ms":[0-9.]*' "$OUT/prof_${preset}_$s.json")"; grep -v INFO "$OUT/prof.err" | tail -n 5 | cut -c1-300
done
python3 benches/cupti/diff.py "$OUT/prof_${preset}_$s1.tsv" "$OUT/prof_${preset}_$s2.tsv" $((s2 - s1)) "${TOP:-45}"
[[ -f "$OUT/prof_${preset}_$s1.tsv.phases" ]] && python3 benches/cupti/phases.py \
  "$OUT/prof_${preset}_$s1.tsv.phases" "$OUT/prof_${preset}_$s2.tsv.phases" $((s2 - s1)) "${PHASE_TOP:-8}"
