//! With the `cuda` feature, compiles `src/cuda/kernels.cu` to PTX with nvcc (`$NVCC`, else
//! `$CUDA_HOME/bin/nvcc`, else `nvcc` on the path; the team's toolchain script sets
//! them; `docs/gpu.md`). The default build does nothing here, so CPU builds need no CUDA toolchain.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(home) => format!("{home}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    // PTX for the virtual architecture: the driver compiles it for the card it loads on.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim_end_matches(['a', 'f']);
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("simclr_kernels.ptx");
    let status = Command::new(&nvcc)
        // No fused multiply-adds: the CPU twins round after each product, and the kernels are
        // memory-bound, so exact agreement costs nothing.
        .args(["--ptx", "-O3", "-std=c++17", "--fmad=false"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/cuda/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run nvcc ({nvcc}): {e}; see docs/gpu.md"));
    assert!(status.success(), "nvcc failed on src/cuda/kernels.cu");
}
