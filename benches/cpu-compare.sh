#!/usr/bin/env bash
# The CPU ratio of book/src/performance.md § "Measured: CPU": the PyTorch reference at the tiny
# preset's sizes and one or more cim-run binaries, alternating, ROUNDS times (the machine's speed
# drifts, so only figures measured side by side compare). One JSON line per run under OUT_DIR,
# then a summary: img/s and the ratio to the reference of the same round.
#   REF=.../torch_cim_ref.py PYTHON=/path/to/venv/bin/python bash benches/cpu-compare.sh target/release/cim-run [other-cim-run …]
# CASE=resnet compares tiny_resnet_revdet instead, with ResNet-50's full 3-4-6-3 layout at width 8
# (the reference's layout; the preset's own has one block per stage) on the preset's 64-px images.
# THREADS=N (default 2) sizes both: the reference's --threads and cim's RAYON_NUM_THREADS.
set -euo pipefail
CASE=${CASE:-vit}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
REF=${REF:?set REF to the PyTorch reference of one CiM step, torch_cim_ref.py}
[ $# -ge 1 ] || { echo "usage: $0 CIM_RUN [CIM_RUN …]" >&2; exit 2; }
for r in $(seq 1 "$ROUNDS"); do
  if [ "$CASE" = resnet ]; then
    "$PYTHON" "$REF" --device cpu --dtype fp32 --threads "$THREADS" --enhancer resnet50 --objective revdet \
      --img 64 --patch 8 --tok-res 32 --dvae-groups 3 --dvae-hid 16 --dvae-init 32 --dvae-blocks 1 \
      --vocab 512 --gen-dim 64 --gen-heads 2 --gen-depth 2 --resnet-width 8 --batch 32 --steps 10 \
      --warmup 2 --no-torchvision --no-flops 2>/dev/null | tail -n 1 > "$OUT_DIR/ref-$r.json"
  else
    "$PYTHON" "$REF" --device cpu --dtype fp32 --threads "$THREADS" --enhancer vit_s16 --objective respix \
      --img 32 --patch 4 --tok-res 32 --dvae-groups 3 --dvae-hid 16 --dvae-init 32 --dvae-blocks 1 \
      --vocab 512 --dim 64 --depth 4 --heads 2 --gen-depth 2 --batch 32 --steps 10 --warmup 2 \
      --no-flops 2>/dev/null | tail -n 1 > "$OUT_DIR/ref-$r.json"
  fi
  i=0
  for bin in "$@"; do
    i=$((i + 1))
    if [ "$CASE" = resnet ]; then
      RAYON_NUM_THREADS="$THREADS" "$bin" bench --preset tiny_resnet_revdet --batch 32 --steps 10 --warmup 2 --device cpu \
        --set 'tokenizer.name="dalle_dvae"' --set 'enhancer.resnet50.layers=[3,4,6,3]' \
        2>/dev/null | tail -n 1 > "$OUT_DIR/cim$i-$r.json"
    else
      RAYON_NUM_THREADS="$THREADS" "$bin" bench --preset tiny_vit_respix --batch 32 --steps 10 --warmup 2 --device cpu \
        --set 'tokenizer.name="dalle_dvae"' 2>/dev/null | tail -n 1 > "$OUT_DIR/cim$i-$r.json"
    fi
  done
done
"$PYTHON" - "$OUT_DIR" "$ROUNDS" "$#" <<'PY'
import json, sys, statistics
out, rounds, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
load = lambda name: json.load(open(f"{out}/{name}.json"))
def phases(runs):
    keys = ["tok_encode", "gen_fwd_bwd", "sample_decode", "enh_fwd_bwd", "optim"]
    return " ".join(f"{k} {statistics.median(d['phase_ms'][k] for d in runs):.1f}" for k in keys)
refs = [load(f"ref-{r}") for r in range(1, rounds + 1)]
ref = [d["images_per_s"] for d in refs]
print(f"reference img/s {[round(x, 1) for x in ref]} median {statistics.median(ref):.1f}; "
      f"median ms: {phases(refs)}")
for i in range(1, n + 1):
    runs = [load(f"cim{i}-{r}") for r in range(1, rounds + 1)]
    ips = [d["images_per_s"] for d in runs]
    ratios = [c / x for c, x in zip(ips, ref)]
    print(f"cim #{i} img/s {[round(x, 1) for x in ips]} median {statistics.median(ips):.1f}; "
          f"ratios {[round(x, 2) for x in ratios]} median {statistics.median(ratios):.2f}; "
          f"loss_last {runs[0]['loss_last']}")
    print(f"  median ms: {phases(runs)}")
print(f"JSON lines in {out}")
PY
