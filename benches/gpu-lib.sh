#!/usr/bin/env bash
# Shared by benches/gpu-suite.sh and benches/gpu-check.sh (sourced, on the GPU machine): settings,
# the summary printer, the parity test and one `cim-run bench` run.
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
              f'cudnn_conv={d.get("cudnn_conv", "-")} sink={d.get("grad_sink", "-")} dvae={tok} '
              f'timing={d.get("phase_timing", "-")} keep_freed={d.get("cuda_keep_freed", "-")} '
              f'upload_cache={d.get("upload_cache", "-")} flash={d.get("flash_attention", "-")} '
              f'regions={d.get("graft_regions", "-")}: '
              f'{d["images_per_s"]:.1f} img/s, step {d["step_ms"]:.1f} ms, peak {d.get("peak_mem_gib", 0):.1f} GiB {ph}')
PY
}

parity() { # the GPU parity test of the CUDA kernels, ok/FAIL per check
  el "GPU parity of the CUDA kernels"
  timeout 120 $RUN .gpu/ops_cuda.xz --test-threads 1 --nocapture > "$OUT/ops_cuda.txt" 2>&1
  echo "rc=$?"; grep -E "^(ok|FAIL) |test result|panicked" "$OUT/ops_cuda.txt" | head -n 40
}

# The device tool returns at most 8 files: every cim bench line goes to $OUT/cim.jsonl, each after a
# {"run": NAME} line.
bench() { # NAME PRESET [--set ...]   (random dVAE weights: speed does not depend on them)
  local name=$1 preset=$2; shift 2
  set -- --set tokenizer.dalle_dvae.weights='"random"' "$@"
  el "cim $name"
  local j="$OUT/cim_now.json"
  RUST_LOG=info timeout 150 $RUN .gpu/cim-run.xz bench --preset "$preset" --batch "$B" \
    --steps "$STEPS" --warmup "$WARMUP" --device cuda:0 "$@" > "$j" 2> "$OUT/cim.err"
  local rc=$?; echo "rc=$rc"; summ "$j"; grep -oE '"tok_precision":\{[^{}]*(\{[^{}]*\})?[^{}]*\}' "$j"
  grep -v " INFO " "$OUT/cim.err" | tail -n 3 | cut -c1-300
  sed 's/\x1b\[[0-9;]*m//g' "$OUT/cim.err" | grep -oE "(dalle_dvae|resnet50) map layout.*" | head -n 2 \
    | cut -c1-120
  if [[ $rc != 0 && "$*" == *cuda_kernels=true* ]]; then # measure the kernels-off path instead
    el "cim $name, kernels off (the run above failed)"
    RUST_LOG=info timeout 150 $RUN .gpu/cim-run.xz bench --preset "$preset" --batch "$B" --steps "$STEPS" \
      --warmup "$WARMUP" --device cuda:0 "${@/cuda_kernels=true/cuda_kernels=false}" > "$j" 2> "$OUT/cim.err"
    echo "rc=$?"; summ "$j"; grep -v " INFO " "$OUT/cim.err" | tail -n 3 | cut -c1-300
  fi
  { echo "{\"run\": \"$name\"}"; grep '^{' "$j"; } >> "$OUT/cim.jsonl"; rm -f "$j"
}
