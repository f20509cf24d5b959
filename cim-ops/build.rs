//! With the `cuda` feature, compiles `kernels/ops.cu` (which includes one `.cu` file per op
//! family) to PTX with the CUDA toolkit's nvcc (`$CUDA_ROOT/bin/nvcc`, else `nvcc` on PATH;
//! architecture from `CUDA_COMPUTE_CAP`, default 90) and leaves it in OUT_DIR for `src/cuda.rs`
//! to embed. The CPU build never runs nvcc.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("cim_ops.ptx");
    let nvcc = std::env::var("CUDA_ROOT")
        .map(|r| PathBuf::from(r).join("bin").join("nvcc"))
        .unwrap_or_else(|_| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let arch = if cap == "90" {
        "sm_90a".to_string()
    } else {
        format!("sm_{cap}")
    };
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch={arch}"), "-o"])
        .arg(&out)
        .arg("kernels/ops.cu")
        .status()
        .unwrap_or_else(|e| panic!("cim-ops (cuda feature): cannot run {}: {e}", nvcc.display()));
    assert!(
        status.success(),
        "cim-ops: nvcc failed on kernels/ops.cu ({status})"
    );
}
