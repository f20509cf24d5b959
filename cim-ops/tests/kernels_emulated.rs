//! CUDA kernels of cim (`kernels/ops.cu`, compiled whole) run on the CPU: `kernels/emulate/cuda_emu.h`
//! stands in for CUDA (a thread per CUDA thread, barriers, warp shuffles, bf16/f16 conversions,
//! WMMA fragments with WMMA's alignment rules), and `kernels/emulate/ops_emu.cpp` launches the
//! kernels as `src/cuda.rs` does and checks each against a direct computation: the flash
//! attention kernels (statistics, output, `d qkv` against double precision), and the kernels a
//! bf16 ViT-B/16 step runs by default that were written after the last GPU parity run (softmax
//! and LayerNorm one warp per row, bias + GELU four per thread, the f16 row argmax, the
//! channels-last resampling and conv epilogue, the 16-byte head-layout copies, the residual adds,
//! the ResNet-50 enhancer's BatchNorm and ReLU, and its channels-last BatchNorm reductions and
//! stem max-pool).
//! Outputs start as NaN, so an element a kernel never writes fails its check. It checks tiling, indexing and synchronisation without a GPU; not
//! the GPU itself (`tests/ops_cuda.rs` does that on the GPU machine). Needs a C++20 compiler
//! (`$CXX`, else `c++`) with AddressSanitizer, as these machines' gcc has.

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_emulated() {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let emulate = kernels.join("emulate");
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("ops_emu");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    // The emulation's stand-ins for <cuda_bf16.h>, <cuda_fp16.h> and <mma.h> come first.
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-pthread",
            "-fno-strict-aliasing",
            "-fsanitize=address",
        ])
        .arg("-I")
        .arg(&emulate)
        .arg("-I")
        .arg(&kernels)
        .arg(emulate.join("ops_emu.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("this test compiles the kernels with `{cxx}` (set CXX): {e}"));
    assert!(
        out.status.success(),
        "compiling the emulated kernels failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "emulated kernels disagree with their reference:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        76,
        "{stdout}"
    );
}
