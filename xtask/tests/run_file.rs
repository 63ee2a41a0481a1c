//! `cargo xtask pipeline --config FILE`: a run's own `pipeline.json` reproduces the run, a
//! `--set` on top changes that one value, and a bad file is a one-line error naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn xtask(args: &[&str], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("pipeline")
        .args(args)
        .args(["--no-progress", "--out"])
        .arg(out)
        .current_dir(workspace_root())
        .env("RAYON_NUM_THREADS", "2")
        .env_remove("SIMCLR_CRASH_AT")
        .output()
        .expect("the xtask binary runs")
}

fn run_dir(root: &Path) -> PathBuf {
    std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("a run folder")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Every model's figures and step count, and the pretraining's, from `report.json`.
fn figures(run: &Path) -> Vec<String> {
    let report = json(&run.join("report.json"));
    let mut out: Vec<String> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {} {} {}", r["stage"], r["top1"], r["top5"], r["steps"]))
        .collect();
    out.push(format!(
        "pretrain {} {}",
        report["pretrain"]["knn_top1"], report["pretrain"]["steps"]
    ));
    out
}

/// A smoke run of the 10 % fraction into `out`.
fn smoke_run(out: &Path) {
    let r = xtask(&["--preset", "smoke", "--fraction", "0.1"], out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn a_runs_own_pipeline_json_reproduces_it_and_a_set_changes_one_value() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|n| dir.path().join(n));
    smoke_run(&a);
    let run_a = run_dir(&a);
    let file = run_a.join("pipeline.json");
    let file = file.to_str().unwrap();

    let r = xtask(&["--config", file], &b);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let run_b = run_dir(&b);
    assert_eq!(run_a.file_name(), run_b.file_name(), "the same run name");
    assert_eq!(
        json(&run_a.join("pipeline.json")),
        json(&run_b.join("pipeline.json"))
    );
    assert_eq!(figures(&run_a), figures(&run_b), "the same figures");
    // The TOML twin of the file reproduces it too.
    let d = dir.path().join("d");
    let toml_file = run_a.join("pipeline.toml");
    let r = xtask(&["--config", toml_file.to_str().unwrap()], &d);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let run_d = run_dir(&d);
    assert_eq!(run_a.file_name(), run_d.file_name(), "the same run name");
    assert_eq!(
        json(&run_a.join("pipeline.json")),
        json(&run_d.join("pipeline.json"))
    );
    assert_eq!(figures(&run_a), figures(&run_d), "the same figures");

    let r = xtask(
        &["--config", file, "--set", "distill.schedule.train_steps=2"],
        &c,
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut want = json(&run_a.join("pipeline.json"));
    assert_ne!(want["distill"]["schedule"]["train_steps"], 2);
    want["distill"]["schedule"]["train_steps"] = 2.into();
    assert_eq!(json(&run_dir(&c).join("pipeline.json")), want);
}

#[test]
fn a_bad_run_file_or_a_flag_it_would_override_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let bad = dir.path().join("run.json");
    std::fs::write(&bad, b"{\"preset\": \"smoke\", \"fractions\": [0.1]").unwrap();
    let r = xtask(&["--config", bad.to_str().unwrap()], &out);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("run.json"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "nothing is written for a bad run file");

    let bad_toml = dir.path().join("run.toml");
    std::fs::write(&bad_toml, b"preset = \"smoke\"\nfractions = [0.1\n").unwrap();
    let r = xtask(&["--config", bad_toml.to_str().unwrap()], &out);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("run.toml") && err.contains("pipeline.toml"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "nothing is written for a bad run file");

    let missing = dir.path().join("missing.json");
    let r = xtask(&["--config", missing.to_str().unwrap()], &out);
    assert!(String::from_utf8_lossy(&r.stderr).contains("missing.json"));

    let r = xtask(&["--config", bad.to_str().unwrap(), "--seed", "3"], &out);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn a_split_file_gives_the_labelled_images_of_its_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|n| dir.path().join(n));
    smoke_run(&a);
    let drawn = run_dir(&a).join("fraction-0.1/labelled_split.txt");
    let names = std::fs::read_to_string(&drawn).unwrap();
    // The drawn images listed in another order, as a hand-written file might list them.
    let mut lines: Vec<&str> = names.lines().collect();
    lines.reverse();
    let file = dir.path().join("10percent.txt");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();

    let file_arg = file.to_str().unwrap();
    let r = xtask(
        &[
            "--preset",
            "smoke",
            "--fraction",
            "0.1",
            "--split-file",
            file_arg,
        ],
        &b,
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let run_b = run_dir(&b);
    let folder = std::fs::read_dir(&run_b)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("fraction-0.1-split-"))
        .expect("the split file's own fraction folder");
    let used = std::fs::read_to_string(run_b.join(&folder).join("labelled_split.txt")).unwrap();
    let mut want: Vec<&str> = names.lines().collect();
    let mut got: Vec<&str> = used.lines().collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want, "the file's images, no others");
    assert_eq!(
        json(&run_b.join("pipeline.json"))["split_files"][0],
        file_arg,
        "recorded in the run's configuration"
    );

    // A file of the wrong size for its fraction, one naming an image that does not exist, and
    // a count of files that does not match the fractions: one-line errors naming the file.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "no-such-image.png\n").unwrap();
    let bad_arg = bad.to_str().unwrap();
    for (args, says) in [
        (
            vec!["--fraction", "0.5", "--split-file", file_arg],
            "10percent.txt",
        ),
        (
            vec!["--fraction", "0.1", "--split-file", bad_arg],
            "bad.txt",
        ),
        (
            vec![
                "--fraction",
                "0.1",
                "--fraction",
                "0.5",
                "--split-file",
                file_arg,
            ],
            "one --split-file per --fraction",
        ),
    ] {
        let mut all = vec!["--preset", "smoke"];
        all.extend(args);
        let r = xtask(&all, &c);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{all:?}");
        assert!(err.contains(says), "{all:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// The workspace root.
fn workspace_root() -> std::path::PathBuf {
    simclr_fs::manifest_dir(env!("CARGO_MANIFEST_DIR")).join("..")
}
