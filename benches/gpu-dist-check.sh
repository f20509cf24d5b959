#!/usr/bin/env bash
# The data-parallel check on a GPU machine (~2 min; carry [".gpu"]: .gpu/cim-run.xz built with
# `--features cudnn,nccl` and ../shared/cuda/run-on-gpu.sh copied to .gpu/). tiny_vit_respix on the
# embedded photographs, 20 steps at a global batch of 32 in micro-batches of 8:
#   1. one process, no backend;
#   2. one process through NCCL (`dist.backend = "nccl"`: a communicator of one rank, every
#      collective of the step on the GPU) — it must match run 1;
#   3. with NGPU > 1 (one rank per GPU; NCCL takes no two ranks on one GPU): torchrun with NGPU
#      ranks — it must match run 1 up to the order gradients are summed in.
# Prints each run's losses and the largest relative difference to run 1. Files go under $OUT.
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
NGPU=${NGPU:-1}
RUN="bash .gpu/run-on-gpu.sh .gpu/cim-run.xz"
# libnccl.so.2 from PyTorch's wheels (the binary loads it by name).
for d in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) \
         /opt/torch/.venv/lib/python3*/site-packages; do
  [[ -e "$d/nvidia/nccl/lib/libnccl.so.2" ]] && { export LD_LIBRARY_PATH="$d/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; }
done
ARGS=(--preset tiny_vit_respix --steps 20 --set data.source='"quickstart"' --set run.device='"auto"'
      --set train.batch_size=32 --set train.micro_batch=8 --set run.tensorboard=false)
one() { # NAME [ARGS...]
  local name=$1; shift
  echo "== $name"
  RUST_LOG=info timeout 240 "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "rc=$?"; grep -E "cim-run: rank|error|done:" "$OUT/$name.log" | head -n 6
}
one single $RUN "${ARGS[@]}"
one nccl1 $RUN "${ARGS[@]}" --set dist.backend='"nccl"'
if (( NGPU > 1 )); then
  one "nccl$NGPU" torchrun --standalone --nproc-per-node "$NGPU" --no-python $RUN "${ARGS[@]}"
fi
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name, "metrics.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else None
base = load("single")
for name in sorted(os.listdir(out)):
    m = load(name) if name.startswith("nccl") else None
    if base is None or m is None:
        continue
    worst = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)
                for a, b in zip(m, base) for k in ("loss", "loss_mim", "loss_respix", "grad_norm"))
    print(f"{name}: {len(m)} steps, largest relative difference to one process {worst:.3e}; "
          f"loss {m[0]['loss']:.4f} -> {m[-1]['loss']:.4f}")
PY
