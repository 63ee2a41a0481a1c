//! The smoke pipeline killed with SIGKILL at chosen points (mid-stage, inside a checkpoint
//! write between its temporary file and the rename, between stages) and started again until it
//! finishes ends with the same checkpoints, tensor for tensor, and the same figures as a run
//! that was never interrupted. The points are reached through the `SIMCLR_CRASH_AT` hook
//! (`simclr_models::checkpoint::crash_point`), so every kill lands exactly where it is meant to.

#![cfg(unix)]

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};

fn pipeline(out: &Path, crash_at: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args([
        "pipeline",
        "--preset",
        "smoke",
        "--fraction",
        "0.1",
        "--no-progress",
    ])
    // A checkpoint after every step of every stage, so kills land between checkpoints too.
    .args(["--set", "pretrain.checkpoint_every=1"])
    .args(["--set", "finetune.*.checkpoint_every=1"])
    .args(["--set", "baseline.*.checkpoint_every=1"])
    .args(["--set", "distill.checkpoint_every=1"])
    .arg("--out")
    .arg(out)
    .current_dir(workspace_root())
    .env("RAYON_NUM_THREADS", "2")
    .env_remove("SIMCLR_CRASH_AT");
    if let Some(point) = crash_at {
        c.env("SIMCLR_CRASH_AT", point);
    }
    c.output().expect("the xtask binary runs")
}

/// Every `checkpoint.safetensors` under `root`, by path relative to it.
fn checkpoints(root: &Path) -> BTreeMap<PathBuf, PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.file_name().is_some_and(|n| n == "checkpoint.safetensors") {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn figures(root: &Path) -> Vec<(String, String)> {
    let run = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for r in report["results"].as_array().unwrap() {
        for key in ["top1", "top5", "steps"] {
            out.push((format!("{} {key}", r["stage"]), r[key].to_string()));
        }
    }
    for key in ["knn_top1", "knn_top1_random_init", "steps", "recipe"] {
        out.push((
            format!("pretrain {key}"),
            report["pretrain"][key].to_string(),
        ));
    }
    out
}

#[test]
fn a_pipeline_killed_anywhere_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    let r = pipeline(&reference, None);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let crashed = dir.path().join("crashed");
    let points = [
        "pretrain:step:2",
        "pretrain:checkpoint:2",
        "pipeline:after:pretrain",
        "finetune:step:2",
        "finetune:checkpoint:3",
        "pipeline:after:finetune",
        "supervised:checkpoint:1",
        "pipeline:after:supervised",
        "distill:step:1",
        "distill:checkpoint:3",
        "pipeline:after:distill",
    ];
    for point in points {
        let r = pipeline(&crashed, Some(point));
        assert_eq!(
            r.status.signal(),
            Some(libc_sigkill()),
            "{point}: the run was not killed there (status {:?}); stderr: {}",
            r.status,
            String::from_utf8_lossy(&r.stderr)
        );
    }
    let r = pipeline(&crashed, None);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let (a, b) = (checkpoints(&reference), checkpoints(&crashed));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert_eq!(a.len(), 4, "pretrain, finetune, baseline and distill");
    for (rel, pa) in &a {
        let (ma, ta) = simclr_models::checkpoint::load_tensors(pa, &Device::Cpu).unwrap();
        let (mb, tb) = simclr_models::checkpoint::load_tensors(&b[rel], &Device::Cpu).unwrap();
        assert_eq!(
            (ma.step, &ma.config),
            (mb.step, &mb.config),
            "{}",
            rel.display()
        );
        assert_eq!(ma.extra["complete"], "true");
        assert_eq!(mb.extra["complete"], "true");
        assert_eq!(ta.len(), tb.len(), "{}", rel.display());
        for (name, t) in &ta {
            let bits = |t: &candle_core::Tensor| -> Vec<u64> {
                let v = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
                v.to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert!(
                bits(t) == bits(&tb[name]),
                "{}: tensor {name} differs from the uninterrupted run",
                rel.display()
            );
        }
    }
    assert_eq!(figures(&reference), figures(&crashed));
    // Nothing half-written was left behind.
    for p in b.values() {
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{}: {leftovers:?}", p.display());
    }
}

fn libc_sigkill() -> i32 {
    9
}

/// The workspace root.
fn workspace_root() -> std::path::PathBuf {
    simclr_fs::manifest_dir(env!("CARGO_MANIFEST_DIR")).join("..")
}
