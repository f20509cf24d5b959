#!/usr/bin/env bash
# Lets `cargo build --features nccl` link on a machine without NCCL: writes a link-time stub
# libnccl.so.2 (every ncclXxx function of cudarc's bindings, returning an error) into the CUDA
# toolkit's stubs folder, beside the libcuda stub of ../shared/cuda/setup-toolkit.sh.
#
#   bash tools/nccl-link-stub.sh [PREFIX]      # default PREFIX: $HOME/.cache/cim-cuda
#   source PREFIX/env.sh && cargo build --release --features cudnn,nccl -p cim-run
#
# The binary loads the real libnccl.so.2 at run time: on a GPU machine with PyTorch it is in
# site-packages (nvidia/nccl/lib) — put that folder on LD_LIBRARY_PATH, never the stubs folder.
set -euo pipefail
PREFIX="${1:-$HOME/.cache/cim-cuda}"
STUBS="$PREFIX/root/lib64/stubs"
[[ -d "$STUBS" ]] || { echo "no toolkit at $PREFIX (run ../shared/cuda/setup-toolkit.sh first)" >&2; exit 1; }
CUDARC="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1)"
[[ -n "$CUDARC" ]] || { echo "cudarc 0.19 not in the cargo registry: run 'cargo fetch' first" >&2; exit 1; }
mkdir -p "$PREFIX/stubsrc"
grep -ohE "^pub unsafe fn nccl[A-Za-z0-9_]+" "$CUDARC"/src/nccl/sys/mod.rs | awk '{print $4}' | sort -u \
  | awk '{print "int "$1"(void){return 1;}"}' > "$PREFIX/stubsrc/libnccl.so.2.c"
gcc -shared -fPIC -o "$STUBS/libnccl.so.2" -Wl,-soname,libnccl.so.2 "$PREFIX/stubsrc/libnccl.so.2.c"
ln -sfn libnccl.so.2 "$STUBS/libnccl.so"
echo "wrote $STUBS/libnccl.so.2 ($(wc -l < "$PREFIX/stubsrc/libnccl.so.2.c") functions)"
