//! `cargo xtask cuda-build`: the CUDA binary built on a machine without a GPU, for the lent
//! H100/H200 (compute capability 9.0, driver 580 = CUDA 13.0), from PyPI and crates.io alone.
//!
//! Three steps (`docs/gpu.md` states the facts they rest on):
//! 1. `--install`: the CUDA 13.0 toolkit wheels (`cuda-toolkit[…]==13.0.2`; NCCL and cuDNN wheels
//!    when the features ask for them) into a prefix under `~/.cache`, the unversioned library
//!    names the linker looks for (the wheels ship only `libfoo.so.N`), and a stub `libcuda.so`
//!    (the driver library is not on PyPI, and cudarc's dynamic linking makes every driver entry
//!    point a link-time symbol): one function per `cu*` entry point of cudarc's bindings, each
//!    returning `CUDA_ERROR_NO_DEVICE`. The stub is for linking here only.
//! 2. the build: `cargo build --release -p simclr --features …` into `target-cuda/` with the
//!    toolkit's `nvcc`, `CUDA_COMPUTE_CAP=90` and cudarc's CUDA 13.0 bindings.
//! 3. `--stage DIR`: the binary gzipped into `DIR/simclr.gz` (`gpu-bin/` by default), which
//!    `bench/gpu_check.sh` unpacks on the GPU machine, where the CUDA libraries come from the
//!    machine's PyTorch.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The toolkit release: 13.0.x, since PTX from nvcc 13.1 and later carries an ISA that a 580
/// driver cannot load.
pub const TOOLKIT: &str = "13.0.2";
const CUDNN: &str = "9.19.0.56";
const NCCL: &str = "2.28.9";
/// H100 and H200.
const COMPUTE_CAP: &str = "90";
/// cudarc's bindings for the CUDA 13.0 API.
const CUDARC_CUDA_VERSION: &str = "13000";
/// The driver's "no device" error, what every stub entry point returns.
const CUDA_ERROR_NO_DEVICE: i32 = 100;

/// What `cargo xtask cuda-build` was asked for.
#[derive(clap::Args)]
pub struct CudaBuild {
    /// Install the toolkit first (PyPI wheels, unversioned library links, a libcuda stub).
    #[arg(long)]
    pub install: bool,
    /// Cargo features of the simclr crate: cuda, cuda,nccl, cuda,cudnn, …
    #[arg(long, default_value = "cuda")]
    pub features: String,
    /// Where the toolkit lives (default ~/.cache/cuda13-pypi).
    #[arg(long)]
    pub prefix: Option<PathBuf>,
    /// Gzip the binary into this folder as simclr.gz (default gpu-bin).
    #[arg(long, num_args = 0..=1, default_missing_value = "gpu-bin")]
    pub stage: Option<PathBuf>,
    /// The Python whose pip installs the toolkit.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Cargo's target folder for this build (default target-cuda/, apart from the CPU build's).
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
    /// Extra arguments for cargo build, after `--`.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

fn workspace_root() -> PathBuf {
    crate::workspace_root()
}

fn default_prefix() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("cuda13-pypi")
}

/// Where the toolkit wheel puts `bin/nvcc`, `include/` and `lib/`.
fn cuda_home(prefix: &Path) -> PathBuf {
    prefix.join("py/nvidia/cu13")
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start"))?;
    if !status.success() {
        bail!("{what} failed ({status})")
    }
    Ok(())
}

fn pip_install(python: &str, target: &Path, no_deps: bool, packages: &[String]) -> Result<()> {
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--upgrade",
    ])
    .arg("--target")
    .arg(target);
    if no_deps {
        cmd.arg("--no-deps");
    }
    cmd.args(packages);
    run(&mut cmd, &format!("pip install {}", packages.join(" ")))
}

/// `lib/libfoo.so` -> `libfoo.so.N` for every versioned library in `lib`.
fn link_unversioned(lib: &Path) -> Result<()> {
    for entry in std::fs::read_dir(lib).with_context(|| format!("{}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some((base, _)) = name.split_once(".so.") else {
            continue;
        };
        relink(Path::new(&name), &lib.join(format!("{base}.so")))?;
    }
    Ok(())
}

/// `link` -> `target`, replacing whatever `link` was (an install run again).
fn relink(target: &Path, link: &Path) -> Result<()> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).with_context(|| format!("linking {}", link.display()))
}

/// The driver entry points cudarc binds: `pub unsafe fn cuXxx(` in its `driver/sys` module.
fn driver_entry_points(bindings: &str) -> Vec<String> {
    let mut names: Vec<String> = bindings
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("pub unsafe fn cu"))
        .map(|rest| {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            format!("cu{ident}")
        })
        .filter(|n| n.len() > 2)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// C source of a `libcuda.so` whose every entry point fails with "no device".
fn stub_source(names: &[String]) -> String {
    let mut c = format!(
        "/* Link-time stand-in for the NVIDIA driver library: {} entry points, each failing with \
         CUDA_ERROR_NO_DEVICE. Never on a GPU machine's library path. */\n",
        names.len()
    );
    c += "static const char *why = \"CUDA_ERROR_NO_DEVICE (stub libcuda: no driver here)\";\n";
    c += "int cuGetErrorString(int e, const char **s) { (void)e; if (s) *s = why; return 0; }\n";
    c += "int cuGetErrorName(int e, const char **s) { (void)e; if (s) *s = \"CUDA_ERROR_NO_DEVICE\"; return 0; }\n";
    for n in names {
        if n != "cuGetErrorString" && n != "cuGetErrorName" {
            c += &format!("int {n}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n");
        }
    }
    c
}

/// cudarc's source folder, from `cargo metadata` with the CUDA feature on.
fn cudarc_dir() -> Result<PathBuf> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--features",
            "simclr/cuda",
        ])
        .current_dir(workspace_root())
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let manifest = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "cudarc"))
        .and_then(|p| p["manifest_path"].as_str())
        .context("cudarc is not in the dependency graph with --features simclr/cuda")?;
    Ok(Path::new(manifest)
        .parent()
        .context("cudarc's manifest has no folder")?
        .to_path_buf())
}

fn install(opts: &CudaBuild, prefix: &Path) -> Result<()> {
    std::fs::create_dir_all(prefix)?;
    pip_install(
        &opts.python,
        &prefix.join("py"),
        false,
        &[format!(
            "cuda-toolkit[nvcc,crt,nvvm,cccl,cudart,nvrtc,cublas,curand]=={TOOLKIT}"
        )],
    )?;
    let home = cuda_home(prefix);
    let lib = home.join("lib");
    let mut extra = Vec::new();
    if opts.features.contains("nccl") {
        extra.push((format!("nvidia-nccl-cu13=={NCCL}"), "nccl", "libnccl.so.2"));
    }
    if opts.features.contains("cudnn") {
        extra.push((
            format!("nvidia-cudnn-cu13=={CUDNN}"),
            "cudnn",
            "libcudnn.so.9",
        ));
    }
    if !extra.is_empty() {
        let packages: Vec<String> = extra.iter().map(|e| e.0.clone()).collect();
        pip_install(&opts.python, &prefix.join("py-extra"), true, &packages)?;
    }
    link_unversioned(&lib)?;
    for (_, name, file) in &extra {
        let src = prefix.join(format!("py-extra/nvidia/{name}/lib/{file}"));
        relink(&src, &lib.join(format!("lib{name}.so")))?;
    }
    let bindings = cudarc_dir()?.join("src/driver/sys/mod.rs");
    let text = std::fs::read_to_string(&bindings)
        .with_context(|| format!("reading {}", bindings.display()))?;
    let names = driver_entry_points(&text);
    if names.is_empty() {
        bail!("no driver entry points found in {}", bindings.display())
    }
    let source = prefix.join("libcuda_stub.c");
    std::fs::write(&source, stub_source(&names))?;
    let stubs = lib.join("stubs");
    std::fs::create_dir_all(&stubs)?;
    run(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o"])
            .arg(stubs.join("libcuda.so"))
            .arg(&source),
        "compiling the libcuda stub",
    )?;
    println!(
        "toolkit {TOOLKIT} in {} (libcuda stub: {} entry points)",
        home.display(),
        names.len()
    );
    Ok(())
}

fn build(opts: &CudaBuild, prefix: &Path, target_dir: &Path) -> Result<()> {
    let home = cuda_home(prefix);
    if !home.join("lib/stubs/libcuda.so").exists() {
        bail!(
            "no CUDA toolkit in {}: run `cargo xtask cuda-build --install` first",
            prefix.display()
        )
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![home.join("bin")];
    paths.extend(std::env::split_paths(&path));
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "--release",
        "-p",
        "simclr",
        "--features",
        &opts.features,
    ])
    .args(&opts.cargo_args)
    .current_dir(workspace_root())
    .env("CUDA_HOME", &home)
    .env("NVCC", home.join("bin/nvcc"))
    .env("PATH", std::env::join_paths(paths)?)
    .env("CUDA_COMPUTE_CAP", COMPUTE_CAP)
    .env("CUDARC_CUDA_VERSION", CUDARC_CUDA_VERSION)
    .env("CARGO_TARGET_DIR", target_dir);
    run(&mut cmd, "the CUDA build")
}

fn stage(binary: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let out = dir.join("simclr.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&bytes)?;
    let packed = gz.finish()?;
    std::fs::write(&out, &packed).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "staged {} ({:.1} MiB, {:.1} MiB gzipped) as {}",
        binary.display(),
        bytes.len() as f64 / 1048576.0,
        packed.len() as f64 / 1048576.0,
        out.display()
    );
    Ok(())
}

/// Runs the steps asked for: install, build, stage.
pub fn cuda_build(opts: &CudaBuild) -> Result<()> {
    let prefix = opts.prefix.clone().unwrap_or_else(default_prefix);
    if opts.install {
        install(opts, &prefix)?;
    }
    let target_dir = opts
        .target_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("target-cuda"));
    build(opts, &prefix, &target_dir)?;
    if let Some(dir) = &opts.stage {
        stage(&target_dir.join("release/simclr"), dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_has_one_failing_function_per_bound_entry_point() {
        let bindings = "
            pub unsafe fn cuInit(flags: u32) -> CUresult { x }
            pub unsafe fn cuDeviceGet(d: *mut i32, o: i32) -> CUresult { x }
                pub unsafe fn cuGetErrorString(e: CUresult, s: *mut *const i8) -> CUresult { x }
            pub fn cuNotUnsafe() {}
            pub unsafe fn cuInit(flags: u32) -> CUresult { x }
            pub unsafe fn other() {}
        ";
        let names = driver_entry_points(bindings);
        assert_eq!(names, ["cuDeviceGet", "cuGetErrorString", "cuInit"]);
        let c = stub_source(&names);
        assert!(c.contains("int cuInit(void) { return 100; }"), "{c}");
        assert!(c.contains("int cuDeviceGet(void) { return 100; }"), "{c}");
        assert_eq!(c.matches("cuGetErrorString").count(), 1, "{c}");
    }
}
