//! cim's flash-attention CUDA kernels (`kernels/ops.cu`, from `namespace fa {` to the end), run on
//! the CPU: `kernels/emulate/cuda_emu.h` stands in for CUDA (a thread per CUDA thread, barriers,
//! warp shuffles, WMMA fragments with WMMA's alignment rules), and `kernels/emulate/flash_emu.cpp`
//! launches the kernels as `src/ops/cuda.rs` does and checks the statistics, the output and
//! `d qkv` against attention computed in double precision. It checks the kernels' tiling,
//! indexing and synchronisation without a GPU (not the GPU itself: `tests/ops_cuda.rs` does that
//! on the GPU machine). Needs a C++20 compiler (`$CXX`, else `c++`) with AddressSanitizer, as
//! these machines' gcc has.

use std::path::Path;
use std::process::Command;

#[test]
fn flash_kernels_emulated() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let src = std::fs::read_to_string(root.join("ops.cu")).expect("kernels/ops.cu");
    let start = src
        .find("\nnamespace fa {")
        .expect("ops.cu has the flash section (`namespace fa {`)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("flash_section.inc"), &src[start + 1..]).unwrap();
    let exe = dir.path().join("flash_emu");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-fno-strict-aliasing", "-fsanitize=address"])
        .arg("-I")
        .arg(root.join("emulate"))
        .arg("-I")
        .arg(dir.path())
        .arg(root.join("emulate").join("flash_emu.cpp"))
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
        "the emulated flash kernels disagree with the reference:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 4, "{stdout}");
}
