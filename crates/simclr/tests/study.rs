//! `cargo xtask study --plan small` in-process: every cell of the grid and every chart is
//! produced, every claim is judged, and a second run reuses the finished stages.

use clap::Parser;
use simclr::study::{run, StudyArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: StudyArgs,
}

#[test]
fn the_small_plan_produces_every_cell_chart_and_verdict_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();
    let args = Cli::parse_from(["study", "--plan", "small", "--out", out, "--no-progress"]).args;
    let dir = run(&args, &candle_core::Device::Cpu).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("study.json")).unwrap()).unwrap();
    let cells = json["cells"].as_array().unwrap();
    let seed0: Vec<&serde_json::Value> = cells.iter().filter(|c| c["seed"] == 0).collect();
    // 5 pretrainings, 9 + 4 head-layer-1 fine-tunings, 3 baselines, 3 encoder fine-tunings,
    // 4 distillations.
    assert_eq!(seed0.len(), 28, "{seed0:#?}");
    for c in &seed0 {
        let top1 = c["top1"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&top1), "{c}");
        assert!(
            std::path::Path::new(c["checkpoint"].as_str().unwrap()).is_file(),
            "{c}"
        );
    }
    let claims = json["claims"].as_array().unwrap();
    assert_eq!(claims.len(), 5 + 2 + 7 + 4);
    for c in claims {
        assert!(!c["margins"].as_array().unwrap().is_empty(), "{c}");
        assert_ne!(c["verdict"], "not measured", "{c}");
    }
    // A second seed ran exactly the claims the first left unresolved.
    let unresolved_after_seed0 = claims
        .iter()
        .filter(|c| {
            let m = c["margins"][0][1].as_f64().unwrap();
            m.abs() <= 2.0
        })
        .count();
    let seeds = json["seeds"].as_array().unwrap();
    assert_eq!(seeds.len(), if unresolved_after_seed0 > 0 { 2 } else { 1 });
    let md = std::fs::read_to_string(dir.join("study.md")).unwrap();
    for name in [
        "a_top1.svg",
        "a_gain.svg",
        "b_size.svg",
        "c_head_depth.svg",
        "c_selector.svg",
        "d_distill.svg",
    ] {
        let svg = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{name}");
        assert!(!svg.contains("NaN"), "{name}");
        assert!(md.contains(&format!("]({name})")), "{name} not in study.md");
    }
    // One line chart point per width and fraction; bars for every model of (a) and (d).
    let b = std::fs::read_to_string(dir.join("b_size.svg")).unwrap();
    assert_eq!(b.matches(r#"class="point""#).count(), 9);
    let d = std::fs::read_to_string(dir.join("d_distill.svg")).unwrap();
    assert_eq!(d.matches(r#"class="bar""#).count(), 8);
    assert_eq!(md.matches("\n| (").count(), claims.len());

    // Again: every stage is reused, the figures are the same.
    let again = run(&args, &candle_core::Device::Cpu).unwrap();
    let json2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(again.join("study.json")).unwrap()).unwrap();
    let top1 = |j: &serde_json::Value| -> Vec<(String, f64)> {
        j["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].to_string(), c["top1"].as_f64().unwrap()))
            .collect()
    };
    assert_eq!(top1(&json), top1(&json2));
}

#[test]
fn one_finding_runs_and_reports_only_its_cells() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();
    let argv = [
        "study",
        "--plan",
        "small",
        "--finding",
        "d",
        "--out",
        out,
        "--no-progress",
    ];
    let args = Cli::parse_from(argv).args;
    let dir = run(&args, &candle_core::Device::Cpu).unwrap();
    // Its own report folder: a whole-plan report in the same `--out` is not overwritten.
    assert!(
        dir.ends_with("study-small-fashion-mnist-subset-seed0-d"),
        "{dir:?}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("study.json")).unwrap()).unwrap();
    let names: Vec<&str> = json["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["seed"] == 0)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    // Per fraction: the width-8 teacher, the width-2 start, the two students; and the two
    // pretrainings they come from.
    assert_eq!(names.len(), 2 + 4 * 2, "{names:?}");
    assert!(!names
        .iter()
        .any(|n| n.starts_with("baseline") || n.contains("/100%")));
    let claims = json["claims"].as_array().unwrap();
    assert_eq!(claims.len(), 4);
    assert!(claims.iter().all(|c| c["finding"] == "D"), "{claims:?}");
    let md = std::fs::read_to_string(dir.join("study.md")).unwrap();
    assert!(md.contains("seed 0: the cells of finding (d)"), "{md}");
    assert!(dir.join("d_distill.svg").is_file());
    assert!(!dir.join("a_top1.svg").exists() && !dir.join("b_size.svg").exists());
}
