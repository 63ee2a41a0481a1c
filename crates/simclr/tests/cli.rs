//! The `simclr` binary end to end on bad input: a clear error naming the value or file, a
//! non-zero exit, no panic and no backtrace; and flags that must reach the stage as given.

use std::path::Path;
use std::process::{Command, Output};

fn simclr(args: &[&str], cwd: impl AsRef<Path>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(args)
        .current_dir(cwd.as_ref())
        .env_remove("RUST_BACKTRACE")
        .env("NO_COLOR", "1")
        .output()
        .expect("the simclr binary runs")
}

/// Fails with a message that contains every one of `needles`, and without a panic.
fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail; stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "a panic: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }
}

/// One training step of a ResNet-18 at base width 4 on 8 images.
const ONE_TINY_STEP: [&str; 8] = [
    "--resnet-depth",
    "18",
    "--base-width",
    "4",
    "--train-steps",
    "1",
    "--train-batch-size",
    "8",
];

/// The repository root, where the committed subset lives.
fn root() -> std::path::PathBuf {
    simclr_fs::manifest_dir(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn bad_values_are_named_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();

    let missing = dir.path().join("no-such-folder");
    let missing = missing.to_str().unwrap();
    let r = simclr(
        &[
            "pretrain",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            missing,
            "--out",
            out,
        ],
        root(),
    );
    fails_with(&r, &["no-such-folder"]);

    let r = simclr(
        &["pretrain", "--color-jitter-strength", "inf", "--out", out],
        root(),
    );
    fails_with(&r, &["color_jitter_strength", "inf"]);

    let r = simclr(
        &[
            "finetune",
            "--from-scratch",
            "--fraction",
            "0.1",
            "--split-file",
            "x.txt",
            "--out",
            out,
        ],
        root(),
    );
    fails_with(&r, &["--split-file", "--fraction"]);

    let r = simclr(
        &[
            "finetune",
            "--from-scratch",
            "--fraction",
            "1.5",
            "--out",
            out,
        ],
        root(),
    );
    fails_with(&r, &["1.5", "(0, 1]"]);
}

#[test]
fn ft_proj_selector_defaults_to_1_from_a_pretrained_checkpoint_and_an_explicit_0_is_kept() {
    // One pretraining step of a tiny network, then one fine-tuning step from it: without the
    // flag the SimCLRv2 default (the first head layer, 1); `--ft-proj-selector 0` (the encoder
    // output, SimCLRv1's choice) must reach the checkpoint as given, not be raised to 1.
    let dir = tempfile::tempdir().unwrap();
    let tiny = ["--resnet-depth", "18", "--base-width", "4", "--no-progress"];
    let steps = ["--train-steps", "1", "--train-batch-size", "8"];
    let pre = dir.path().join("pre");
    let mut args = vec![
        "pretrain",
        "--knn-every-epochs",
        "0",
        "--out",
        pre.to_str().unwrap(),
    ];
    args.extend(tiny.iter().chain(&steps));
    let r = simclr(&args, root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ckpt = pre.join("checkpoint.safetensors");
    for (flag, want) in [(None, 1), (Some("0"), 0)] {
        let out = dir.path().join(format!("ft{want}"));
        let mut args = vec![
            "finetune",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--fraction",
            "0.1",
            "--no-progress",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(&steps);
        if let Some(v) = flag {
            args.extend(["--ft-proj-selector", v]);
        }
        let r = simclr(&args, root());
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let meta =
            simclr_models::checkpoint::read_meta(out.join("checkpoint.safetensors")).unwrap();
        assert_eq!(meta.config.ft_proj_selector, want, "flag {flag:?}");
    }
}

#[test]
fn a_split_file_sets_the_epochs_from_its_own_fraction() {
    // The 10 % split a --fraction 0.1 run wrote, read back with --split-file: 30 epochs (the
    // recipe for more than 1 % of labels), not the 60 of the default --fraction 0.01.
    let dir = tempfile::tempdir().unwrap();
    let tiny: Vec<&str> = ["--from-scratch", "--no-progress"]
        .into_iter()
        .chain(ONE_TINY_STEP)
        .collect();
    let epochs = |out: &Path| -> u64 {
        let meta =
            simclr_models::checkpoint::read_meta(out.join("checkpoint.safetensors")).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&meta.extra["finetune_config"]).unwrap();
        cfg["schedule"]["train_epochs"].as_u64().unwrap()
    };
    let first = dir.path().join("fraction");
    let mut args = vec![
        "finetune",
        "--fraction",
        "0.1",
        "--out",
        first.to_str().unwrap(),
    ];
    args.extend(&tiny);
    let r = simclr(&args, root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(epochs(&first), 30);
    let split = first.join("labelled_split.txt");
    let second = dir.path().join("split");
    let mut args = vec![
        "finetune",
        "--split-file",
        split.to_str().unwrap(),
        "--out",
        second.to_str().unwrap(),
    ];
    args.extend(&tiny);
    let r = simclr(&args, root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(epochs(&second), 30);
    assert_eq!(
        std::fs::read(&split).unwrap(),
        std::fs::read(second.join("labelled_split.txt")).unwrap(),
        "the same labelled images"
    );
}

#[test]
fn a_diverging_run_stops_non_zero_in_one_line_and_keeps_a_finite_checkpoint() {
    // Both cases of the robustness issue: LARS at lr 1e6 (BN variances overflow) and momentum
    // at 1e8 (the loss grows to 1e16 while finite; that run used to exit 0). With
    // RUST_BACKTRACE=1, as in many developers' shells, the error is still one line.
    for (optimizer, lr) in [("lars", "1e6"), ("momentum", "1e8")] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let r = Command::new(env!("CARGO_BIN_EXE_simclr"))
            .args([
                "pretrain",
                "--resnet-depth",
                "18",
                "--base-width",
                "4",
                "--train-batch-size",
                "32",
                "--warmup-epochs",
                "0",
                "--checkpoint-every",
                "2",
                "--optimizer",
                optimizer,
                "--learning-rate",
                lr,
                "--train-steps",
                "20",
                "--out",
                out.to_str().unwrap(),
            ])
            .current_dir(root())
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        fails_with(&r, &["stopping"]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{optimizer}: {err}");
        // Whatever it names as the last good checkpoint is healthy: the loaders, which refuse
        // non-finite tensors, read it.
        let ckpt = out.join("checkpoint.safetensors");
        if err.contains("last good checkpoint") {
            simclr_models::checkpoint::load(&ckpt, &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("{optimizer}: {e}"));
        }
    }
}

#[test]
fn counts_that_would_be_ignored_or_unbounded_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    // 0 used to mean "derive from the epochs" in silence.
    let r = simclr(&["pretrain", "--train-steps", "0", "--out", out], root());
    fails_with(&r, &["--train-steps", "0"]);
    // One thread each: 100,000 of them hung the machine.
    let r = simclr(
        &["pretrain", "--num-workers", "100000", "--out", out],
        root(),
    );
    fails_with(&r, &["--num-workers", "100000"]);
}

/// `root/{train,val}/<class>/<k>.png`: 3 classes of 4 small grey images each.
fn write_image_folder(root: &Path, classes: &[&str]) {
    for split in ["train", "val"] {
        for (c, class) in classes.iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for k in 0..4u32 {
                let img = image::GrayImage::from_fn(12, 12, |x, y| {
                    image::Luma([((x * 20 + y * (c as u32 + 1) * 9 + k * 13) % 256) as u8])
                });
                img.save(dir.join(format!("{k}.png"))).unwrap();
            }
        }
    }
}

/// A supervised checkpoint evaluated on data whose classes are named otherwise (a renamed
/// class folder, so labels no longer mean the same) is refused, naming the label that differs.
#[test]
fn eval_refuses_data_whose_classes_are_not_the_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_image_folder(&data, &["cat", "dog", "fox"]);
    let out = dir.path().join("ft");
    let common = [
        "--dataset",
        "imagefolder",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let mut args = vec![
        "finetune",
        "--from-scratch",
        "--resnet-depth",
        "18",
        "--base-width",
        "2",
        "--image-size",
        "8",
        "--fraction",
        "1",
        "--train-steps",
        "1",
        "--train-batch-size",
        "4",
        "--no-progress",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(common);
    let r = simclr(&args, root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ckpt = out.join("checkpoint.safetensors");
    let eval = |extra: &[&str]| {
        let mut a = vec![
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--image-size",
            "8",
            "--knn",
            "false",
        ];
        a.extend(common);
        a.extend(extra);
        simclr(&a, root())
    };
    let r = eval(&[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for split in ["train", "val"] {
        std::fs::rename(data.join(split).join("dog"), data.join(split).join("wolf")).unwrap();
    }
    fails_with(
        &eval(&[]),
        // Sorted, the classes are now cat, fox, wolf: label 1 was "dog" and is "fox".
        &[
            "checkpoint.safetensors",
            "label 1: \"dog\"",
            "\"fox\" in the data",
        ],
    );
}

/// Architecture flags where the architecture comes from a checkpoint used to be dropped in
/// silence; now each such combination is refused, naming the flags and where the network comes
/// from.
#[test]
fn architecture_flags_that_a_checkpoint_would_override_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("pretrained.safetensors");
    let ckpt = ckpt.to_str().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let r = simclr(
        &[
            "finetune",
            "--checkpoint",
            ckpt,
            "--resnet-depth",
            "34",
            "--base-width",
            "8",
            "--out",
            out,
        ],
        root(),
    );
    fails_with(&r, &["--resnet-depth, --base-width would be ignored", ckpt]);
    let r = simclr(
        &[
            "finetune",
            "--checkpoint",
            ckpt,
            "--from-scratch",
            "--out",
            out,
        ],
        root(),
    );
    fails_with(&r, &["--from-scratch", "--checkpoint"]);
    let r = simclr(
        &[
            "distill",
            "--teacher",
            ckpt,
            "--student-checkpoint",
            ckpt,
            "--width-multiplier",
            "2",
            "--out",
            out,
        ],
        root(),
    );
    fails_with(
        &r,
        &[
            "--width-multiplier would be ignored",
            "--student-checkpoint",
        ],
    );
    let r = simclr(
        &[
            "distill",
            "--teacher",
            ckpt,
            "--proj-out-dim",
            "64",
            "--out",
            out,
        ],
        root(),
    );
    fails_with(
        &r,
        &["--proj-out-dim would be ignored", "--student-from-flags"],
    );
    assert!(!Path::new(out).exists(), "nothing was written");
}

/// The official code's spellings (`--train_batch_size`, `--resnet_depth=18`) do what the
/// kebab-case flags do.
#[test]
fn official_flag_spellings_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let stored = |spell: &[&str], name: &str| -> serde_json::Value {
        let out = dir.path().join(name);
        let mut args = vec![
            "finetune",
            "--from-scratch",
            "--train-steps",
            "1",
            "--no-progress",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(spell);
        let r = simclr(&args, root());
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let meta =
            simclr_models::checkpoint::read_meta(out.join("checkpoint.safetensors")).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&meta.extra["finetune_config"]).unwrap();
        serde_json::json!({
            "batch": cfg["train_batch_size"],
            "depth": meta.config.resnet_depth,
            "width": meta.config.base_width,
            "head": meta.config.proj_head_mode,
            "bn_decay": meta.config.batch_norm_decay,
        })
    };
    let official = stored(
        &[
            "--train_batch_size",
            "8",
            "--resnet_depth=18",
            "--base_width",
            "4",
            "--proj_head_mode=linear",
            "--batch_norm_decay",
            "0.99",
        ],
        "official",
    );
    let kebab = stored(
        &[
            "--train-batch-size",
            "8",
            "--resnet-depth=18",
            "--base-width",
            "4",
            "--proj-head-mode=linear",
            "--batch-norm-decay",
            "0.99",
        ],
        "kebab",
    );
    assert_eq!(official, kebab);
    assert_eq!(
        official,
        serde_json::json!({"batch": 8, "depth": 18, "width": 4, "head": "linear", "bn_decay": 0.99})
    );
    // The pretraining-only flag and the evaluation batch.
    let pre = dir.path().join("pre");
    // Python's spelling of a boolean, as the official flags are written.
    let mut args = vec!["pretrain", "--global_bn=False", "--knn-every-epochs", "0"];
    args.extend(["--no-progress", "--out", pre.to_str().unwrap()]);
    args.extend(ONE_TINY_STEP);
    let r = simclr(&args, root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let meta = simclr_models::checkpoint::read_meta(pre.join("checkpoint.safetensors")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&meta.extra["pretrain_config"]).unwrap();
    assert_eq!(cfg["global_bn"], false);
    let ckpt = pre.join("checkpoint.safetensors");
    let r = simclr(
        &[
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--knn=false",
            "--eval_batch_size",
            "7",
            "--no-progress",
        ],
        root(),
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    fails_with(
        &simclr(
            &[
                "eval",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--eval-batch-size",
                "0",
            ],
            root(),
        ),
        &["--eval-batch-size", "0"],
    );
}

#[test]
fn an_exported_model_imports_back_with_bit_identical_outputs() {
    // One pretraining and one fine-tuning step of a tiny network; the fine-tuned checkpoint
    // (supervised head on head layer 1) goes out as a converter .pth and as a Hugging Face
    // folder; `simclr import` of the .pth and the folder's model.safetensors must give the
    // logits of the original to the bit.
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let tiny = ["--resnet-depth", "18", "--base-width", "4", "--no-progress"];
    let steps = ["--train-steps", "1", "--train-batch-size", "8"];
    let mut args = vec!["pretrain", "--knn-every-epochs", "0"];
    let pre = d("pre");
    args.extend(["--out", &pre]);
    args.extend(tiny.iter().chain(&steps));
    let r = simclr(&args, root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let pre_ckpt = format!("{pre}/checkpoint.safetensors");
    let ft = d("ft");
    let mut args = vec!["finetune", "--checkpoint", &pre_ckpt, "--fraction", "0.1"];
    args.extend(["--no-progress", "--out", &ft]);
    args.extend(&steps);
    let r = simclr(&args, root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ckpt = format!("{ft}/checkpoint.safetensors");

    let out = d("out");
    std::fs::create_dir(&out).unwrap();
    let r = simclr(&["export", &ckpt, &out], root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let pth = format!("{out}/r18_1x_sk0.pth");
    let back = d("back.safetensors");
    let r = simclr(&["import", &pth, &back], root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let hf = d("hf");
    let r = simclr(&["export", &ckpt, &hf, "--format", "hf"], root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let logits = |checkpoint: &str, name: &str| {
        let file = d(name);
        let r = simclr(
            &[
                "embed",
                "--checkpoint",
                checkpoint,
                "--layer",
                "logits_sup",
                "--no-progress",
                "--out",
                &file,
            ],
            root(),
        );
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
        let v = t["features"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    let original = logits(&ckpt, "a.safetensors");
    assert!(original.len() >= 10);
    assert_eq!(logits(&back, "b.safetensors"), original, "through the .pth");
    let hf_weights = format!("{hf}/model.safetensors");
    assert_eq!(
        logits(&hf_weights, "c.safetensors"),
        original,
        "the HF folder"
    );

    // A .pth name the importer could not read is refused, naming the one it needs.
    let wrong = d("model.pth");
    fails_with(
        &simclr(&["export", &ckpt, &wrong], root()),
        &["model.pth", "r18_1x_sk0.pth"],
    );
    assert!(!Path::new(&wrong).exists());
}

/// Starts `simclr rendezvous-check` once per rank with that rank's environment and returns each
/// process's (rank, world size, id) as printed.
fn rendezvous_ranks(envs: &[Vec<(&str, String)>]) -> Vec<(String, String, String)> {
    const LAUNCH_VARS: [&str; 13] = [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_USE_AGENT_STORE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_STEP_NUM_TASKS",
        "CUDA_VISIBLE_DEVICES",
        "SLURM_LOCALID",
        "SLURM_JOB_NODELIST",
        "SLURM_JOB_ID",
    ];
    let children: Vec<_> = envs
        .iter()
        .map(|vars| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_simclr"));
            c.args(["rendezvous-check", "--timeout-secs", "30"]);
            for v in LAUNCH_VARS {
                c.env_remove(v);
            }
            c.envs(vars.iter().map(|(k, v)| (k, v)));
            c.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("the simclr binary starts")
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // "rank R of W (local rank L, from S): rendezvous A, id HEX"
            let word = |after: &str| {
                text.split(after)
                    .nth(1)
                    .and_then(|t| t.split([' ', ',', ')', '\n']).next())
                    .unwrap_or_default()
                    .to_string()
            };
            (word("rank "), word(" of "), word(" id "))
        })
        .collect()
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

#[test]
fn torchrun_and_slurm_environments_place_each_process_and_the_ranks_meet() {
    let port = free_port();
    let torchrun: Vec<Vec<(&str, String)>> = (0..2)
        .map(|r| {
            vec![
                ("RANK", r.to_string()),
                ("WORLD_SIZE", "2".to_string()),
                ("LOCAL_RANK", r.to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.clone()),
            ]
        })
        .collect();
    let port = free_port();
    let slurm: Vec<Vec<(&str, String)>> = (0..2)
        .map(|r| {
            vec![
                ("SLURM_PROCID", r.to_string()),
                ("SLURM_STEP_NUM_TASKS", "2".to_string()),
                ("SLURM_LOCALID", r.to_string()),
                ("SLURM_JOB_NODELIST", "localhost".to_string()),
                ("SLURM_JOB_ID", "77".to_string()),
                ("MASTER_PORT", port.clone()),
            ]
        })
        .collect();
    for (launcher, envs) in [("torchrun", torchrun), ("slurm", slurm)] {
        let got = rendezvous_ranks(&envs);
        let ranks: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(ranks, ["0", "1"], "{launcher}: {got:?}");
        assert!(got.iter().all(|g| g.1 == "2"), "{launcher}: {got:?}");
        assert_eq!(got[0].2.len(), 32, "{launcher}: {got:?}");
        assert_eq!(got[0].2, got[1].2, "{launcher}: one id on every rank");
    }
    // Without flags or a launcher's environment there is nothing to check.
    fails_with(
        &simclr(&["rendezvous-check"], root()),
        &["no launch to check"],
    );
}

#[test]
fn simclr_pipeline_runs_the_smoke_preset_as_xtask_does() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    let r = simclr(
        &[
            "pipeline",
            "--preset",
            "smoke",
            "--fraction",
            "0.1",
            "--no-progress",
            "--out",
            out.to_str().unwrap(),
        ],
        root(),
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let run = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(report.contains("fine-tuned"), "{report}");
    fails_with(
        &simclr(&["--device", "cpu", "pipeline", "--gpus", "0,1"], root()),
        &["--device and --gpus"],
    );
}

#[test]
fn a_stage_runs_again_from_the_config_json_it_wrote() {
    // A pretraining step writes its settings to config.json; `--config` of that file (as JSON,
    // and as the same settings in TOML) trains with the same settings; a hyperparameter flag
    // beside it is refused.
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let first = d("first");
    let mut args = vec![
        "pretrain",
        "--knn-every-epochs",
        "0",
        "--temperature",
        "0.3",
    ];
    args.extend(["--no-progress", "--out", &first]);
    args.extend(ONE_TINY_STEP);
    let r = simclr(&args, root());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let file = format!("{first}/config.json");
    let settings = |out: &str| -> serde_json::Value {
        let meta =
            simclr_models::checkpoint::read_meta(format!("{out}/checkpoint.safetensors")).unwrap();
        serde_json::from_str(&meta.extra["pretrain_config"]).unwrap()
    };
    let want = settings(&first);
    assert_eq!(want["objective"]["temperature"], 0.3);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(
        written, want,
        "config.json holds what the checkpoint records"
    );

    let toml_file = d("pretrain.toml");
    let as_toml = toml::to_string(
        &serde_json::from_value::<simclr_pretrain::PretrainConfig>(written).unwrap(),
    )
    .unwrap();
    std::fs::write(&toml_file, as_toml).unwrap();
    for (name, config) in [("again", &file), ("from-toml", &toml_file)] {
        let out = d(name);
        let r = simclr(
            &[
                "pretrain",
                "--config",
                config,
                "--no-progress",
                "--out",
                &out,
            ],
            root(),
        );
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(settings(&out), want, "{name}");
    }
    fails_with(
        &simclr(
            &[
                "pretrain",
                "--config",
                &file,
                "--temperature",
                "0.5",
                "--out",
                &d("x"),
            ],
            root(),
        ),
        &["--temperature", "--config"],
    );
    fails_with(
        &simclr(
            &[
                "finetune",
                "--config",
                &d("missing.json"),
                "--from-scratch",
                "--out",
                &d("y"),
            ],
            root(),
        ),
        &["missing.json"],
    );
}
