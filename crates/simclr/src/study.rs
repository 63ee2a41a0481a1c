//! `cargo xtask study`: the paper's four findings, measured on the user's data by one command.
//!
//! (a) pretraining + fine-tuning against the supervised baseline on the same labels, per label
//! fraction; (b) the gain from a bigger network per fraction (its Figure 1); (c) fine-tuning
//! from the first projection-head layer against the encoder output, and projection heads of 2,
//! 3 and 4 layers (its Figures 4–5); (d) self-distillation, and a big teacher distilled into a
//! small network against that network fine-tuned directly (its Table 3).
//!
//! The study owns the grid and the verdicts only. Every cell is a stage of the pipeline
//! (`crate::pipeline`), in the pipeline's run folders under the same `--out`: one pretraining
//! per network serves all its cells, and a cell whose stage has finished (in this study, an
//! earlier one, or a `cargo xtask pipeline` run with the same settings) is reused, so an
//! interrupted study continues where it stopped. Every cell is the pipeline with `--model` and
//! `--set` settings, so a user can run any of them by hand (`study.md` lists them).
//!
//! Seeds: the first seed runs every cell; a finding whose margins lie within
//! [`PlanSpec::close_margin`] points reruns its cells on the next seed, up to
//! [`PlanSpec::max_seeds`], and its verdict weighs the margin against the seeds' spread.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::json;
use simclr_distill::StudentInit;

use crate::charts::{bar_chart, line_chart};
use crate::pipeline::{
    baseline_stage, distill_from, distill_stage, draw_splits, finetune_stage, folder_name,
    fraction_dir, load_data, pretrain_stage, write_run_files, DistillPair, PipelineConfig, Preset,
    RunData, StageContext, StageResult,
};

/// How big a study is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// The smoke preset's few steps on a tiny subset: every cell and chart, no accuracy (CI).
    Small,
    /// The default preset on the committed subset, widths 4/8/16: about three hours on 2 cores
    /// for two seeds.
    Default,
    /// The same grid on the whole Fashion-MNIST at widths 16/32/64: for a bigger machine.
    Full,
}

/// A plan's grid: every number the study sweeps.
#[derive(Clone, Debug, Serialize)]
pub struct PlanSpec {
    /// The pipeline preset every cell starts from.
    pub preset: Preset,
    pub dataset: &'static str,
    /// ResNet-18 base widths, smallest first; the last is the main network of (a), (c) and
    /// (d) and the teacher of the big → small distillation, the first its student.
    pub widths: Vec<usize>,
    /// Projection-head depths of (c); 3 (SimCLRv2's) is the main network's.
    pub head_depths: Vec<usize>,
    /// Label fractions, fewest first.
    pub fractions: Vec<f64>,
    /// A cap on the labelled stages' steps (the baseline's recipe asks 100 epochs, which at
    /// 100 % of the labels would outlast the rest of the grid).
    pub max_labelled_steps: Option<u64>,
    /// Seeds a finding may use.
    pub max_seeds: usize,
    /// A finding whose margin (in points) is smaller than this on one seed runs another.
    pub close_margin: f64,
    /// Settings of the big → small distillation cell on top of the preset's (`--set` paths;
    /// the user's `--set` still wins). The preset's distillation is tuned for a student that
    /// starts from its own teacher; a small student that starts from its own fine-tuned
    /// network needs a longer, faster one (`docs/results.md`, session 13).
    pub big_small_distill: Vec<&'static str>,
}

impl PlanSpec {
    /// The main network's width: the largest (the plans list at least one).
    fn main_width(&self) -> usize {
        *self.widths.last().expect("a plan has widths")
    }
}

/// The main network's head depth and the layer it is fine-tuned from (SimCLRv2's).
const MAIN_DEPTH: usize = 3;

impl Plan {
    pub fn spec(self) -> PlanSpec {
        let default = PlanSpec {
            preset: Preset::Default,
            dataset: "fashion-mnist-subset",
            widths: vec![4, 8, 16],
            head_depths: vec![2, MAIN_DEPTH, 4],
            fractions: vec![0.01, 0.1, 1.0],
            // The 10 % count: 10 epochs of all 10,000 labels at batch 128.
            max_labelled_steps: Some(782),
            max_seeds: 2,
            close_margin: 2.0,
            big_small_distill: vec![
                "distill.schedule.learning_rate=0.005",
                "distill.schedule.train_epochs=10",
            ],
        };
        match self {
            Plan::Small => PlanSpec {
                preset: Preset::Smoke,
                widths: vec![2, 4, 8],
                max_labelled_steps: None,
                ..default
            },
            Plan::Default => default,
            Plan::Full => PlanSpec {
                dataset: "fashion-mnist",
                widths: vec![16, 32, 64],
                max_labelled_steps: None,
                ..default
            },
        }
    }
}

/// `cargo xtask study`'s flags.
#[derive(clap::Args, Debug)]
pub struct StudyArgs {
    #[arg(long, value_enum, default_value = "default")]
    pub plan: Plan,
    /// The dataset (default: the plan's: the committed subset, or the whole Fashion-MNIST for
    /// `full`).
    #[arg(long)]
    pub dataset: Option<String>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub source: crate::args::DataSourceArgs,
    /// Network input side (default: the dataset's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// The first seed; a finding whose margins are close runs the next ones too.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A setting of every cell's pipeline configuration (as `cargo xtask pipeline --set`).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub overrides: Vec<String>,
    /// Run only the cells of this finding (a, b, c or d; repeat for several): every finding
    /// when absent. The report judges the chosen findings only.
    #[arg(long = "finding", value_enum, value_name = "FINDING")]
    pub findings: Vec<Finding>,
    /// Where the pipeline run folders and the study's report go.
    #[arg(long, default_value = "checkpoints")]
    pub out: PathBuf,
    #[arg(long)]
    pub no_progress: bool,
}

/// The four findings.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
pub enum Finding {
    A,
    B,
    C,
    D,
}

impl Finding {
    const ALL: [Finding; 4] = [Finding::A, Finding::B, Finding::C, Finding::D];

    fn letter(self) -> &'static str {
        match self {
            Finding::A => "a",
            Finding::B => "b",
            Finding::C => "c",
            Finding::D => "d",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Finding::A => "pretraining + fine-tuning beats supervised training on the same labels, by more when labels are fewer",
            Finding::B => "a bigger network gains more when labels are fewer",
            Finding::C => "fine-tuning from projection-head layer 1 beats the encoder output; a deeper head helps",
            Finding::D => "distillation improves the student: self-distillation, and big → small over the small network fine-tuned directly",
        }
    }
}

/// A measured model: one cell of one seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub seed: u64,
    /// The cell's name (`finetune/w16/h3/head1/1%`, …), the same on every seed.
    pub name: String,
    /// Test top-1 in % (for a pretraining: its kNN top-1).
    pub top1: f64,
    pub wall_seconds: f64,
    pub recipe: String,
    pub checkpoint: PathBuf,
}

/// One claim of a finding: a signed sum of cells' top-1 (points), per seed.
#[derive(Clone, Debug, Serialize)]
pub struct Claim {
    pub finding: Finding,
    pub text: String,
    /// The cells and their signs: the margin is the signed sum of their top-1.
    pub terms: Terms,
    /// The margin on each seed that has all its cells.
    pub margins: Vec<(u64, f64)>,
    pub mean: f64,
    /// Sample standard deviation over the seeds (0 with one).
    pub spread: f64,
    pub verdict: &'static str,
}

/// Names of the cells, one place.
fn pct(f: f64) -> String {
    format!("{}%", (f * 100.0 * 1000.0).round() / 1000.0)
}
fn pre_cell(w: usize, d: usize) -> String {
    format!("pretrain/w{w}/h{d}")
}
fn ft_cell(w: usize, d: usize, f: f64) -> String {
    format!("finetune/w{w}/h{d}/head1/{}", pct(f))
}
fn enc_cell(w: usize, f: f64) -> String {
    format!("finetune/w{w}/h{MAIN_DEPTH}/encoder/{}", pct(f))
}
fn base_cell(w: usize, f: f64) -> String {
    format!("baseline/w{w}/{}", pct(f))
}
fn self_cell(w: usize, f: f64) -> String {
    format!("distill/w{w}-self/{}", pct(f))
}
fn big_small_cell(big: usize, small: usize, f: f64) -> String {
    format!("distill/w{big}-to-w{small}/{}", pct(f))
}

/// The fractions distillation runs at: those with unlabelled images.
fn distill_fractions(spec: &PlanSpec) -> Vec<f64> {
    spec.fractions
        .iter()
        .copied()
        .filter(|&f| f < 1.0)
        .collect()
}

/// All measured cells, by seed and name.
#[derive(Default, Serialize)]
struct Cells(BTreeMap<(u64, String), Cell>);

impl Cells {
    fn top1(&self, seed: u64, name: &str) -> Option<f64> {
        self.0.get(&(seed, name.to_string())).map(|c| c.top1)
    }
    fn seeds(&self) -> Vec<u64> {
        let mut s: Vec<u64> = self.0.keys().map(|k| k.0).collect();
        s.dedup();
        s
    }
    /// A cell's mean top-1 over the seeds that ran it (NaN if none did).
    fn mean(&self, name: &str) -> f64 {
        let v: Vec<f64> = self
            .seeds()
            .into_iter()
            .filter_map(|s| self.top1(s, name))
            .collect();
        mean_std(&v).0
    }
    /// `a − b` averaged over the seeds that ran both cells: a second seed that ran only one of
    /// them must not turn another seed's level into a gain.
    fn mean_diff(&self, a: &str, b: &str) -> f64 {
        let v: Vec<f64> = self
            .seeds()
            .into_iter()
            .filter_map(|s| Some(self.top1(s, a)? - self.top1(s, b)?))
            .collect();
        mean_std(&v).0
    }
}

/// One network's run folder and pretraining, for one seed.
struct Network {
    cfg: PipelineConfig,
    run_dir: PathBuf,
    pre: crate::pipeline::Pretraining,
    width: usize,
}

/// What the whole study shares.
struct Study<'a> {
    args: &'a StudyArgs,
    spec: PlanSpec,
    dataset: String,
    image_size: usize,
}

impl Study<'_> {
    /// The pipeline configuration of the ResNet-18 of base width `w` with a `depth`-layer head
    /// at `seed`, its labelled stages sized for `splits` (none: not yet sized).
    fn config(
        &self,
        w: usize,
        depth: usize,
        seed: u64,
        splits: &[Vec<usize>],
    ) -> Result<PipelineConfig> {
        let mut cfg = PipelineConfig::new(
            self.spec.preset,
            &self.dataset,
            self.image_size,
            &self.spec.fractions,
            Some(&format!("r18_w{w}")),
            seed,
        )?;
        cfg.data = self.args.source.clone();
        let mut settings = Vec::new();
        if depth != MAIN_DEPTH {
            settings.push(format!("pretrain.model.num_proj_layers={depth}"));
        }
        settings.extend(self.args.overrides.iter().cloned());
        cfg.apply_overrides(&settings)?;
        if !splits.is_empty() {
            let counts: Vec<usize> = splits.iter().map(Vec::len).collect();
            cfg.size_labelled_stages(&counts);
            if let Some(cap) = self.spec.max_labelled_steps {
                for c in cfg.finetune.iter_mut().chain(cfg.baseline.iter_mut()) {
                    c.training.schedule.train_steps =
                        c.training.schedule.train_steps.map(|s| s.min(cap));
                }
            }
            // The user's settings win over the sizing, as in the pipeline.
            cfg.apply_overrides(&self.args.overrides)?;
        }
        Ok(cfg)
    }

    fn main_width(&self) -> usize {
        self.spec.main_width()
    }
}

/// A fine-tuned network: the stage's summary and folder, and its result.
struct Tuned {
    summary: simclr_train::TrainSummary,
    dir: PathBuf,
    result: StageResult,
}

/// What every cell of one seed shares.
struct SeedRun<'a> {
    study: &'a Study<'a>,
    spec: &'a PlanSpec,
    seed: u64,
    data: RunData,
    splits: Vec<Vec<usize>>,
    device: &'a Device,
    networks: BTreeMap<(usize, usize), Network>,
}

impl<'a> SeedRun<'a> {
    fn new(study: &'a Study<'a>, seed: u64, device: &'a Device) -> Result<Self> {
        // Every network of a seed reads the same images and labelled splits: the main one's
        // configuration decides them (they depend on the dataset, subsets and seed only).
        let cfg = study.config(study.main_width(), MAIN_DEPTH, seed, &[])?;
        let data = load_data(&cfg, study.args.data_dir.clone())?;
        let splits = draw_splits(&cfg, &data)?;
        Ok(SeedRun {
            study,
            spec: &study.spec,
            seed,
            data,
            splits,
            device,
            networks: BTreeMap::new(),
        })
    }

    /// The network of width `w` and head depth `depth`, pretrained (or reused).
    fn network(&mut self, w: usize, depth: usize, cells: &mut Cells) -> Result<&Network> {
        if !self.networks.contains_key(&(w, depth)) {
            let cfg = self.study.config(w, depth, self.seed, &self.splits)?;
            let run_dir = self.study.args.out.join(cfg.run_name());
            write_run_files(&run_dir, &cfg)?;
            let ctx = self.ctx(&cfg);
            let pre = pretrain_stage(&ctx, &run_dir, None)?
                .context("a single-process pretraining always returns")?;
            let cell = Cell {
                seed: self.seed,
                name: pre_cell(w, depth),
                top1: 100.0 * pre.knn,
                wall_seconds: pre.summary.wall_seconds,
                recipe: format!(
                    "ResNet-18 base width {w}, {depth}-layer projection head; {} pretraining steps; kNN top-1 (random init {:.2} %)",
                    pre.summary.steps,
                    100.0 * pre.knn_random
                ),
                checkpoint: pre.summary.checkpoint.clone(),
            };
            announce(&cell);
            cells.0.insert((self.seed, cell.name.clone()), cell);
            self.networks.insert(
                (w, depth),
                Network {
                    cfg,
                    run_dir,
                    pre,
                    width: w,
                },
            );
        }
        Ok(&self.networks[&(w, depth)])
    }

    fn ctx<'c>(&'c self, cfg: &'c PipelineConfig) -> StageContext<'c> {
        StageContext {
            cfg,
            train: self.data.train.clone(),
            test: self.data.test.clone(),
            image_size: self.study.image_size,
            progress: !self.study.args.no_progress,
            device: self.device,
        }
    }

    /// Fraction `k`'s folder of `net`, with its labelled split written into it.
    fn fraction_dir(&self, net: &Network, k: usize) -> Result<PathBuf> {
        let f = self.spec.fractions[k];
        fraction_dir(&self.ctx(&net.cfg), &net.run_dir, k, f, &self.splits[k])
    }

    /// Fine-tunes `net` at fraction `k` from projection-head layer `selector` (0: the encoder
    /// output); returns the result and the stage's folder.
    fn finetune(&self, net: &Network, k: usize, selector: i32) -> Result<Tuned> {
        let mut settings = net.cfg.finetune[k].clone();
        settings.ft_proj_selector = selector;
        let ctx = self.ctx(&net.cfg);
        let dir = self.fraction_dir(net, k)?;
        let f = self.spec.fractions[k];
        let (summary, ft_dir, result, _) =
            finetune_stage(&ctx, &dir, &settings, f, &self.splits[k], &net.pre)?;
        Ok(Tuned {
            summary,
            dir: ft_dir,
            result,
        })
    }

    fn record(&self, cells: &mut Cells, name: String, r: &StageResult) {
        let cell = Cell {
            seed: self.seed,
            name,
            top1: 100.0 * r.top1,
            wall_seconds: r.wall_seconds,
            recipe: r.recipe.clone(),
            checkpoint: r.checkpoint.clone(),
        };
        announce(&cell);
        cells.0.insert((self.seed, cell.name.clone()), cell);
    }

    /// Runs the cells named in `needed` (and those they start from) on this seed.
    fn run(&mut self, needed: &BTreeSet<String>, cells: &mut Cells) -> Result<()> {
        let spec = self.spec;
        let main = self.study.main_width();
        let small = spec.widths[0];
        let nf = spec.fractions.len();
        let need = |name: &str| needed.contains(name);
        // Fine-tuning from head layer 1, for every network a needed cell uses.
        let mut tuned: BTreeMap<(usize, usize, usize), Tuned> = BTreeMap::new();
        for &w in &spec.widths {
            for &d in &spec.head_depths {
                let uses = need(&pre_cell(w, d))
                    || (0..nf).any(|k| {
                        let f = spec.fractions[k];
                        need(&ft_cell(w, d, f))
                            || (d == MAIN_DEPTH
                                && [enc_cell(w, f), base_cell(w, f)].iter().any(|c| need(c)))
                    });
                if !uses {
                    continue;
                }
                self.network(w, d, cells)?;
                for k in 0..nf {
                    let f = spec.fractions[k];
                    if need(&ft_cell(w, d, f)) {
                        let t = self.finetune(&self.networks[&(w, d)], k, 1)?;
                        self.record(cells, ft_cell(w, d, f), &t.result);
                        tuned.insert((w, d, k), t);
                    }
                }
            }
        }
        for k in 0..nf {
            let f = spec.fractions[k];
            let main_net = || {
                self.networks
                    .get(&(main, MAIN_DEPTH))
                    .context("the main network is pretrained first")
            };
            if need(&base_cell(main, f)) {
                let net = main_net()?;
                let ctx = self.ctx(&net.cfg);
                let dir = self.fraction_dir(net, k)?;
                let (r, _) = baseline_stage(&ctx, &dir, &net.cfg.baseline[k], f, &self.splits[k])?;
                self.record(cells, base_cell(main, f), &r);
            }
            if need(&enc_cell(main, f)) {
                let t = self.finetune(main_net()?, k, 0)?;
                self.record(cells, enc_cell(main, f), &t.result);
            }
        }
        for k in 0..nf {
            let f = spec.fractions[k];
            let teacher = tuned.get(&(main, MAIN_DEPTH, k));
            if need(&self_cell(main, f)) {
                let t = teacher.context("the teacher is fine-tuned first")?;
                let big = &self.networks[&(main, MAIN_DEPTH)];
                let ctx = self.ctx(&big.cfg);
                let dir = self.fraction_dir(big, k)?;
                // Self-distillation exactly as the pipeline runs it (the preset says where the
                // student starts), so that the two share the stage.
                let (r, _) =
                    distill_stage(&ctx, &dir, f, &self.splits[k], &big.pre, &t.summary, &t.dir)?;
                self.record(cells, self_cell(main, f), &r);
            }
            if need(&big_small_cell(main, small, f)) {
                let t = teacher.context("the teacher is fine-tuned first")?;
                let student = tuned
                    .get(&(small, MAIN_DEPTH, k))
                    .context("the small network is fine-tuned first")?;
                let big = &self.networks[&(main, MAIN_DEPTH)];
                let net = &self.networks[&(small, MAIN_DEPTH)];
                let mut cfg = net.cfg.clone();
                let own: Vec<String> = self
                    .spec
                    .big_small_distill
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                cfg.apply_overrides(&own)?;
                cfg.apply_overrides(&self.study.args.overrides)?;
                let ctx = self.ctx(&cfg);
                let dir = self.fraction_dir(net, k)?;
                // The student starts from the small network fine-tuned directly, so that the
                // comparison isolates what the big teacher's labels on the unlabelled images
                // add.
                let pair = DistillPair {
                    teacher: &t.summary.checkpoint,
                    upstream: format!(
                        "{}/{}|student={}/{}",
                        folder_name(&big.run_dir),
                        folder_name(&t.dir),
                        folder_name(&net.run_dir),
                        folder_name(&student.dir)
                    ),
                    student: StudentInit::Checkpoint(student.summary.checkpoint.clone()),
                    student_desc: format!("fine-tuned width-{}", net.width),
                };
                let (r, _) = distill_from(&ctx, &dir, f, &self.splits[k], &pair)?;
                self.record(cells, big_small_cell(main, small, f), &r);
            }
        }
        Ok(())
    }
}

fn announce(c: &Cell) {
    println!(
        "study: seed {} {}: {:.2}% top-1 ({:.0} s)",
        c.seed, c.name, c.top1, c.wall_seconds
    );
}

/// Every cell of the grid: what the first seed runs and the charts show.
fn grid(spec: &PlanSpec) -> BTreeSet<String> {
    let main = spec.main_width();
    let small = spec.widths[0];
    let mut out = BTreeSet::new();
    for &w in &spec.widths {
        out.insert(pre_cell(w, MAIN_DEPTH));
        for &f in &spec.fractions {
            out.insert(ft_cell(w, MAIN_DEPTH, f));
        }
    }
    for &f in &spec.fractions {
        out.insert(base_cell(main, f));
        out.insert(enc_cell(main, f));
    }
    for f in distill_fractions(spec) {
        for &d in &spec.head_depths {
            out.insert(pre_cell(main, d));
            out.insert(ft_cell(main, d, f));
        }
        out.insert(self_cell(main, f));
        out.insert(big_small_cell(main, small, f));
    }
    out
}

/// The cells the first seed runs for `findings`: the whole grid for all four; else the cells
/// their claims compare (with [`cells_of`]'s teachers and students), and what their charts
/// show besides: for (a) the self-distilled network, for (b) every width's pretraining and
/// fine-tuned cells.
fn first_seed_cells(spec: &PlanSpec, findings: &[Finding]) -> BTreeSet<String> {
    if Finding::ALL.iter().all(|f| findings.contains(f)) {
        return grid(spec);
    }
    let all = claims(spec, &Cells::default());
    let chosen: Vec<&Claim> = all
        .iter()
        .filter(|c| findings.contains(&c.finding))
        .collect();
    let mut out = cells_of(spec, &chosen);
    if findings.contains(&Finding::A) {
        let main = spec.main_width();
        out.extend(distill_fractions(spec).iter().map(|&f| self_cell(main, f)));
    }
    if findings.contains(&Finding::B) {
        for &w in &spec.widths {
            out.insert(pre_cell(w, MAIN_DEPTH));
            for &f in &spec.fractions {
                out.insert(ft_cell(w, MAIN_DEPTH, f));
            }
        }
    }
    out
}

/// The cells a set of claims compares, with the fine-tuned teachers and students their
/// distillation cells start from.
fn cells_of(spec: &PlanSpec, claims: &[&Claim]) -> BTreeSet<String> {
    let main = spec.main_width();
    let small = spec.widths[0];
    let mut out: BTreeSet<String> = claims
        .iter()
        .flat_map(|c| c.terms.iter().map(|t| t.0.clone()))
        .collect();
    for &f in &spec.fractions {
        if out.contains(&self_cell(main, f)) {
            out.insert(ft_cell(main, MAIN_DEPTH, f));
        }
        if out.contains(&big_small_cell(main, small, f)) {
            out.insert(ft_cell(main, MAIN_DEPTH, f));
            out.insert(ft_cell(small, MAIN_DEPTH, f));
        }
    }
    out
}

/// Cells and signs: a claim's margin is the signed sum of their top-1.
type Terms = Vec<(String, f64)>;

/// The claims of each finding (what the paper says, as a signed sum of cells' top-1 that
/// is positive when it holds), judged on the cells measured so far.
fn claims(spec: &PlanSpec, cells: &Cells) -> Vec<Claim> {
    let main = spec.main_width();
    let small = spec.widths[0];
    let d = MAIN_DEPTH;
    let diff = |a: String, b: String| vec![(a, 1.0), (b, -1.0)];
    let diff2 = |x: Vec<(String, f64)>, y: Vec<(String, f64)>| {
        x.into_iter()
            .chain(y.into_iter().map(|(c, s)| (c, -s)))
            .collect::<Vec<_>>()
    };
    let mut list: Vec<(Finding, String, Terms)> = Vec::new();
    let gain = |f: f64| diff(ft_cell(main, d, f), base_cell(main, f));
    for &f in &spec.fractions {
        list.push((
            Finding::A,
            format!("fine-tuned − baseline at {}", pct(f)),
            gain(f),
        ));
    }
    for w in spec.fractions.windows(2) {
        list.push((
            Finding::A,
            format!(
                "(fine-tuned − baseline) at {} − at {}",
                pct(w[0]),
                pct(w[1])
            ),
            diff2(gain(w[0]), gain(w[1])),
        ));
    }
    let bigger = |f: f64| diff(ft_cell(main, d, f), ft_cell(small, d, f));
    for w in spec.fractions.windows(2) {
        list.push((
            Finding::B,
            format!(
                "(width {main} − width {small}) at {} − at {}",
                pct(w[0]),
                pct(w[1])
            ),
            diff2(bigger(w[0]), bigger(w[1])),
        ));
    }
    for &f in &spec.fractions {
        list.push((
            Finding::C,
            format!("head layer 1 − encoder output at {}", pct(f)),
            diff(ft_cell(main, d, f), enc_cell(main, f)),
        ));
    }
    for f in distill_fractions(spec) {
        for &depth in spec.head_depths.iter().filter(|&&x| x > 2) {
            list.push((
                Finding::C,
                format!("{depth}-layer head − 2-layer head at {}", pct(f)),
                diff(ft_cell(main, depth, f), ft_cell(main, 2, f)),
            ));
        }
    }
    for f in distill_fractions(spec) {
        list.push((
            Finding::D,
            format!("self-distilled − its teacher at {}", pct(f)),
            diff(self_cell(main, f), ft_cell(main, d, f)),
        ));
        list.push((
            Finding::D,
            format!(
                "width {small} distilled from width {main} − width {small} fine-tuned at {}",
                pct(f)
            ),
            diff(big_small_cell(main, small, f), ft_cell(small, d, f)),
        ));
    }
    list.into_iter()
        .map(|(finding, text, terms)| {
            let margins: Vec<(u64, f64)> = cells
                .seeds()
                .into_iter()
                .filter_map(|s| {
                    let mut m = 0.0;
                    for (cell, sign) in &terms {
                        m += sign * cells.top1(s, cell)?;
                    }
                    Some((s, m))
                })
                .collect();
            let (mean, spread) = mean_std(&margins.iter().map(|m| m.1).collect::<Vec<_>>());
            let verdict = verdict(mean, spread, margins.len(), spec.close_margin);
            Claim {
                finding,
                text,
                terms,
                margins,
                mean,
                spread,
                verdict,
            }
        })
        .collect()
}

const UNRESOLVED: &str = "within the seed spread";

/// Mean and sample standard deviation (0 for one value; NaN for none).
fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    if x.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = x.iter().sum::<f64>() / n;
    if x.len() < 2 {
        return (mean, 0.0);
    }
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// A claim's verdict: held when its mean margin is positive and larger than the seeds' spread
/// (on one seed: at least `close` points), did not hold when negative by as much, else
/// unresolved.
fn verdict(mean: f64, spread: f64, seeds: usize, close: f64) -> &'static str {
    if seeds == 0 || !mean.is_finite() {
        return "not measured";
    }
    let bar = if seeds == 1 { close } else { spread };
    if mean > 0.0 && mean > bar {
        "held"
    } else if mean < 0.0 && -mean > bar {
        "did not hold"
    } else {
        UNRESOLVED
    }
}

/// Runs the study and writes its report into `<out>/study-<plan>-<dataset>-seed<N>/`; returns
/// that folder.
pub fn run(args: &StudyArgs, device: &Device) -> Result<PathBuf> {
    let t0 = Instant::now();
    let spec = args.plan.spec();
    let dataset = args.dataset.clone().unwrap_or(spec.dataset.to_string());
    let image_size = crate::args::DataArgs {
        dataset: dataset.clone(),
        data_dir: args.data_dir.clone(),
        image_size: args.image_size,
        source: args.source.clone(),
        num_workers: 0,
    }
    .image_size()?;
    let study = Study {
        args,
        spec,
        dataset,
        image_size,
    };
    let chosen = if args.findings.is_empty() {
        Finding::ALL.to_vec()
    } else {
        let mut f = args.findings.clone();
        f.sort();
        f.dedup();
        f
    };
    // A study of some findings, or with other settings, reports into a folder of its own, so
    // that it never overwrites the report of the whole plan (or of other settings).
    let mut name = format!(
        "study-{:?}-{}-seed{}",
        args.plan,
        study.dataset.replace([':', '/'], "_"),
        args.seed
    );
    if chosen.len() < Finding::ALL.len() {
        name.push('-');
        name.extend(chosen.iter().map(|f| f.letter()));
    }
    if !args.overrides.is_empty() {
        name.push_str(&format!(
            "-set-{}",
            crate::pipeline::short_hash(&args.overrides)
        ));
    }
    let dir = args.out.join(name.to_lowercase());
    simclr_fs::ensure_writable_dir(&dir)
        .with_context(|| format!("output folder {} cannot be written", dir.display()))?;
    let mut cells = Cells::default();
    let mut seeds_run: Vec<(u64, Vec<Finding>, f64)> = Vec::new();
    for i in 0..study.spec.max_seeds as u64 {
        let (findings, needed) = if i == 0 {
            (chosen.clone(), first_seed_cells(&study.spec, &chosen))
        } else {
            let claims = claims(&study.spec, &cells);
            let open: Vec<&Claim> = claims
                .iter()
                .filter(|c| c.verdict == UNRESOLVED && chosen.contains(&c.finding))
                .collect();
            let mut findings: Vec<Finding> = open.iter().map(|c| c.finding).collect();
            findings.dedup();
            (findings, cells_of(&study.spec, &open))
        };
        if needed.is_empty() {
            break;
        }
        let t = Instant::now();
        let seed = args.seed + i;
        let mut run = SeedRun::new(&study, seed, device)?;
        run.run(&needed, &mut cells)?;
        seeds_run.push((seed, findings, t.elapsed().as_secs_f64()));
        // The report after every seed, so that a study stopped during a later one still
        // shows what it measured.
        write_report(&dir, &study, &cells, &seeds_run, t0.elapsed().as_secs_f64())?;
    }
    println!("study report: {}", dir.join("study.md").display());
    Ok(dir)
}

/// The report's (b) section: fine-tuned top-1 and the gain over the smallest width, per width.
fn b_section(md: &mut String, cells: &Cells, spec: &PlanSpec, params: &[(usize, usize)]) {
    let small = spec.widths[0];
    let _ = writeln!(md, "## (b) Network size (fine-tuned from head layer 1)\n");
    let b_rows: Vec<(String, Vec<(String, f64)>)> = params
        .iter()
        .map(|&(w, p)| {
            let mut row: Vec<(String, f64)> = spec
                .fractions
                .iter()
                .map(|&f| (pct(f), cells.mean(&ft_cell(w, MAIN_DEPTH, f))))
                .collect();
            row.extend(spec.fractions.iter().map(|&f| {
                (
                    format!("gain over width {small} at {}", pct(f)),
                    cells.mean_diff(&ft_cell(w, MAIN_DEPTH, f), &ft_cell(small, MAIN_DEPTH, f)),
                )
            }));
            (
                format!("width {w} ({:.3} M parameters)", p as f64 / 1e6),
                row,
            )
        })
        .collect();
    groups_table(md, "encoder", &b_rows);
    let _ = writeln!(md, "![b_size.svg](b_size.svg)\n");
}

/// The report's (c) section: head layer 1 against the encoder output, and the head's depth.
fn c_section(
    md: &mut String,
    spec: &PlanSpec,
    main: usize,
    c_groups: &[(String, Vec<(String, f64)>)],
    mean_of: &dyn Fn(&str) -> f64,
) {
    let _ = writeln!(
        md,
        "## (c) Where the classifier sits, and the head's depth, width {main}\n"
    );
    groups_table(md, "labels", c_groups);
    let c_rows: Vec<(String, Vec<(String, f64)>)> = spec
        .head_depths
        .iter()
        .map(|&d| {
            (
                format!("{d}-layer head"),
                distill_fractions(spec)
                    .iter()
                    .map(|&f| (pct(f), mean_of(&ft_cell(main, d, f))))
                    .collect(),
            )
        })
        .collect();
    groups_table(md, "projection head", &c_rows);
    let _ = writeln!(
        md,
        "![c_selector.svg](c_selector.svg)\n\n![c_head_depth.svg](c_head_depth.svg)\n"
    );
}

/// A markdown table of `rows` (a label and named values each); the columns are the names in
/// the order they first appear, a value a row lacks is blank.
fn groups_table(md: &mut String, first: &str, rows: &[(String, Vec<(String, f64)>)]) {
    let mut cols: Vec<&str> = Vec::new();
    for (_, vals) in rows {
        for (n, _) in vals {
            if !cols.contains(&n.as_str()) {
                cols.push(n);
            }
        }
    }
    let _ = writeln!(md, "| {first} | {} |", cols.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(cols.len()));
    for (label, vals) in rows {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| {
                vals.iter()
                    .find(|(n, _)| n == c)
                    .filter(|(_, v)| v.is_finite())
                    .map_or(String::new(), |(_, v)| format!("{v:.2}"))
            })
            .collect();
        let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
    }
    let _ = writeln!(md);
}

/// Parameters of the ResNet-18 encoder of base width `w` (projection head and classifier left
/// out, as the paper counts), from the model the stages build.
fn encoder_parameters(cfg: &PipelineConfig) -> Result<usize> {
    let vm = candle_nn::VarMap::new();
    simclr_models::SimclrModel::init(&cfg.pretrain.model, &vm, 0, &Device::Cpu)?;
    let data = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("a poisoned lock"))?;
    Ok(data
        .iter()
        .filter(|(n, _)| n.starts_with("resnet"))
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum())
}

fn write_report(
    dir: &Path,
    study: &Study,
    cells: &Cells,
    seeds_run: &[(u64, Vec<Finding>, f64)],
    wall: f64,
) -> Result<()> {
    let (args, spec) = (study.args, &study.spec);
    // The findings the study was asked for (the first seed's); only they are judged and shown.
    let chosen: &[Finding] = seeds_run.first().map_or(&Finding::ALL[..], |s| &s.1);
    let has = |f: Finding| chosen.contains(&f);
    let mut claims = claims(spec, cells);
    claims.retain(|c| has(c.finding));
    let main = study.main_width();
    let small = spec.widths[0];
    let first = seeds_run.first().map_or(args.seed, |s| s.0);
    let mean_of = |name: &str| cells.mean(name);
    let dataset = &study.dataset;
    let mut params = Vec::new();
    for &w in &spec.widths {
        params.push((
            w,
            encoder_parameters(&study.config(w, MAIN_DEPTH, first, &[])?)?,
        ));
    }
    // With `--set validation_per_class=N` every cell is evaluated on images held out of the
    // training set (the pipeline's tuning protocol), and the report must not call that a test.
    let evaluated_on = if study
        .config(main, MAIN_DEPTH, first, &[])?
        .validation_per_class
        > 0
    {
        "validation"
    } else {
        "test"
    };
    let fr = &spec.fractions;
    // (a)
    let a_groups: Vec<(String, Vec<(String, f64)>)> = fr
        .iter()
        .map(|&f| {
            let mut bars = vec![
                ("baseline".to_string(), mean_of(&base_cell(main, f))),
                (
                    "fine-tuned".to_string(),
                    mean_of(&ft_cell(main, MAIN_DEPTH, f)),
                ),
            ];
            if f < 1.0 {
                bars.push(("distilled".to_string(), mean_of(&self_cell(main, f))));
            }
            (pct(f), bars)
        })
        .collect();
    let gain_groups: Vec<(String, Vec<(String, f64)>)> = fr
        .iter()
        .map(|&f| {
            let base = base_cell(main, f);
            let mut bars = vec![(
                "fine-tuned − baseline".to_string(),
                cells.mean_diff(&ft_cell(main, MAIN_DEPTH, f), &base),
            )];
            if f < 1.0 {
                bars.push((
                    "distilled − baseline".to_string(),
                    cells.mean_diff(&self_cell(main, f), &base),
                ));
            }
            (pct(f), bars)
        })
        .collect();
    // (b)
    let b_series: Vec<(String, Vec<(f64, f64)>)> = fr
        .iter()
        .map(|&f| {
            (
                format!("fine-tuned, {} labels", pct(f)),
                params
                    .iter()
                    .map(|&(w, p)| (p as f64 / 1e6, mean_of(&ft_cell(w, MAIN_DEPTH, f))))
                    .collect(),
            )
        })
        .collect();
    // (c)
    let c_series: Vec<(String, Vec<(f64, f64)>)> = distill_fractions(spec)
        .iter()
        .map(|&f| {
            (
                format!("{} labels", pct(f)),
                spec.head_depths
                    .iter()
                    .map(|&d| (d as f64, mean_of(&ft_cell(main, d, f))))
                    .collect(),
            )
        })
        .collect();
    let c_groups: Vec<(String, Vec<(String, f64)>)> = fr
        .iter()
        .map(|&f| {
            (
                pct(f),
                vec![
                    ("encoder output".to_string(), mean_of(&enc_cell(main, f))),
                    (
                        "head layer 1".to_string(),
                        mean_of(&ft_cell(main, MAIN_DEPTH, f)),
                    ),
                ],
            )
        })
        .collect();
    // (d)
    let d_groups: Vec<(String, Vec<(String, f64)>)> = distill_fractions(spec)
        .iter()
        .map(|&f| {
            (
                pct(f),
                vec![
                    (
                        format!("w{small} fine-tuned"),
                        mean_of(&ft_cell(small, MAIN_DEPTH, f)),
                    ),
                    (
                        format!("w{small} ← w{main}"),
                        mean_of(&big_small_cell(main, small, f)),
                    ),
                    (
                        format!("w{main} teacher"),
                        mean_of(&ft_cell(main, MAIN_DEPTH, f)),
                    ),
                    (format!("w{main} ← w{main}"), mean_of(&self_cell(main, f))),
                ],
            )
        })
        .collect();
    let charts = [
        (
            "a_top1.svg",
            bar_chart(
                &format!("(a) width {main}: {evaluated_on} top-1"),
                "labelled fraction",
                "top-1 (%)",
                &a_groups,
            ),
        ),
        (
            "a_gain.svg",
            bar_chart(
                "(a) gain over the supervised baseline",
                "labelled fraction",
                "points",
                &gain_groups,
            ),
        ),
        (
            "b_size.svg",
            line_chart(
                "(b) fine-tuned top-1 against encoder size",
                "encoder parameters (millions)",
                "top-1 (%)",
                &b_series,
            ),
        ),
        (
            "c_head_depth.svg",
            line_chart(
                &format!("(c) width {main}: projection-head depth"),
                "projection-head layers",
                "top-1 (%)",
                &c_series,
            ),
        ),
        (
            "c_selector.svg",
            bar_chart(
                &format!("(c) width {main}: where the classifier sits"),
                "labelled fraction",
                "top-1 (%)",
                &c_groups,
            ),
        ),
        (
            "d_distill.svg",
            bar_chart(
                "(d) teachers and students",
                "labelled fraction",
                "top-1 (%)",
                &d_groups,
            ),
        ),
    ];
    let finding_of = |chart: &str| {
        Finding::ALL
            .into_iter()
            .find(|f| chart.starts_with(&format!("{}_", f.letter())))
    };
    for (name, svg) in &charts {
        if finding_of(name).is_some_and(has) {
            simclr_data::write_atomic(&dir.join(name), svg.as_bytes())?;
        }
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# SimCLRv2's findings at small scale: plan `{:?}`, {dataset}\n",
        args.plan
    );
    let _ = writeln!(
        md,
        "Top-1 (%) on the {evaluated_on} images of ResNet-18s of base width {} (CIFAR stem), the pipeline's `{:?}` preset. Wall time {:.1} min.",
        spec.widths.iter().map(|w| w.to_string()).collect::<Vec<_>>().join(" / "),
        spec.preset,
        wall / 60.0
    );
    for (seed, findings, secs) in seeds_run {
        let _ = writeln!(
            md,
            "- seed {seed}: {} finding{} {} ({:.1} min)",
            if *seed == first && findings.len() == Finding::ALL.len() {
                "every cell of the grid;"
            } else if *seed == first {
                "the cells of"
            } else {
                "the cells of the unresolved claims of"
            },
            if findings.len() > 1 { "s" } else { "" },
            findings
                .iter()
                .map(|f| format!("({})", f.letter()))
                .collect::<Vec<_>>()
                .join(", "),
            secs / 60.0
        );
    }
    let _ = writeln!(
        md,
        "\nA claim **held** when its mean margin is positive and larger than the seeds' standard deviation (with one seed: at least {} points; a claim closer than that on one seed reruns its finding on the next seed, up to {} seeds).\n",
        spec.close_margin, spec.max_seeds
    );
    let _ = writeln!(md, "## Verdicts\n");
    let _ = writeln!(
        md,
        "| finding | claim | margin per seed (points) | mean ± std | verdict |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for c in &claims {
        let per: Vec<String> = c
            .margins
            .iter()
            .map(|(s, m)| format!("{m:+.2} (seed {s})"))
            .collect();
        let _ = writeln!(
            md,
            "| ({}) | {} | {} | {:+.2} ± {:.2} | {} |",
            c.finding.letter(),
            c.text,
            per.join(", "),
            c.mean,
            c.spread,
            c.verdict
        );
    }
    let _ = writeln!(md);
    for f in Finding::ALL.into_iter().filter(|&f| has(f)) {
        let mine: Vec<&Claim> = claims.iter().filter(|c| c.finding == f).collect();
        let held = mine.iter().filter(|c| c.verdict == "held").count();
        let _ = writeln!(
            md,
            "- **({})** {}: {held} of {} claims held.",
            f.letter(),
            f.title(),
            mine.len()
        );
    }
    // Each finding's figures (means over the seeds that ran the cell), then its charts.
    let _ = writeln!(
        md,
        "\nBelow, a top-1 is the mean over the seeds that ran the cell, and a gain the mean of \
         its difference over the seeds that ran both cells (so a gain need not equal the \
         difference of the two means beside it).\n"
    );
    if has(Finding::A) {
        let _ = writeln!(md, "## (a) Against the supervised baseline, width {main}\n");
        groups_table(&mut md, "labels", &a_groups);
        groups_table(&mut md, "labels", &gain_groups);
        let _ = writeln!(
            md,
            "![a_top1.svg](a_top1.svg)\n\n![a_gain.svg](a_gain.svg)\n"
        );
    }
    if has(Finding::B) {
        b_section(&mut md, cells, spec, &params);
    }
    if has(Finding::C) {
        c_section(&mut md, spec, main, &c_groups, &mean_of);
    }
    if has(Finding::D) {
        let _ = writeln!(md, "## (d) Distillation\n");
        groups_table(&mut md, "labels", &d_groups);
        let _ = writeln!(md, "![d_distill.svg](d_distill.svg)\n");
    }
    let _ = writeln!(md, "## Every cell\n");
    let _ = writeln!(
        md,
        "| seed | cell | top-1 (%) | train s | how it was trained |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for c in cells.0.values() {
        let _ = writeln!(
            md,
            "| {} | `{}` | {:.2} | {:.0} | {} |",
            c.seed, c.name, c.top1, c.wall_seconds, c.recipe
        );
    }
    let _ = writeln!(
        md,
        "\nEncoder parameters: {}.",
        params
            .iter()
            .map(|(w, p)| format!("width {w}: {:.3} M", *p as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cap = spec.max_labelled_steps.map_or(String::new(), |n| {
        format!(
            ", the 100 % cells `--set 'finetune.*.schedule.train_steps={n}' --set 'baseline.*.schedule.train_steps={n}'`"
        )
    });
    let _ = writeln!(
        md,
        "\nAny cell by hand: `cargo xtask pipeline --preset {} --model r18_w<width> --fraction <f> --seed <seed>` with the same `--out` (the head depths add `--set pretrain.model.num_proj_layers=<d>`, the encoder-output classifier `--set 'finetune.*.ft_proj_selector=0'`{cap}); it reuses the study's finished stages.",
        format!("{:?}", spec.preset).to_lowercase()
    );
    simclr_data::write_atomic(&dir.join("study.md"), md.as_bytes())?;
    let json = json!({
        "plan": args.plan,
        "spec": spec,
        "dataset": dataset,
        "seeds": seeds_run.iter().map(|(s, f, t)| json!({"seed": s, "findings": f, "wall_seconds": t})).collect::<Vec<_>>(),
        "wall_seconds": wall,
        "encoder_parameters": params,
        "cells": cells.0.values().collect::<Vec<_>>(),
        "claims": claims,
    });
    simclr_data::write_atomic(
        &dir.join("study.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: StudyArgs,
    }

    fn study_args(extra: &[&str]) -> StudyArgs {
        let mut argv = vec!["study"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args
    }

    fn put(cells: &mut Cells, seed: u64, name: String, top1: f64) {
        let c = Cell {
            seed,
            name: name.clone(),
            top1,
            wall_seconds: 0.0,
            recipe: String::new(),
            checkpoint: PathBuf::new(),
        };
        cells.0.insert((seed, name), c);
    }

    #[test]
    fn a_gain_pairs_the_seeds_that_ran_both_cells() {
        let mut cells = Cells::default();
        put(&mut cells, 0, "a".into(), 70.0);
        put(&mut cells, 0, "b".into(), 67.0);
        // Seed 1 reran `a` only (its claim was unresolved): it moves a's mean, not the gain.
        put(&mut cells, 1, "a".into(), 74.0);
        assert_eq!(cells.mean("a"), 72.0);
        assert_eq!(cells.mean("b"), 67.0);
        assert_eq!(cells.mean_diff("a", "b"), 3.0);
        put(&mut cells, 1, "b".into(), 69.0);
        assert_eq!(cells.mean_diff("a", "b"), 4.0);
        assert!(cells.mean_diff("a", "c").is_nan());
    }

    #[test]
    fn mean_and_spread_are_the_sample_statistics() {
        let (m, s) = mean_std(&[5.0, 1.0]);
        assert_eq!(m, 3.0);
        assert!((s - 8f64.sqrt()).abs() < 1e-12, "{s}");
        let (m, s) = mean_std(&[2.0, 4.0, 9.0]);
        // mean 5, squared deviations 9 + 1 + 16 = 26, over n − 1 = 2.
        assert_eq!(m, 5.0);
        assert!((s - 13f64.sqrt()).abs() < 1e-12, "{s}");
        assert_eq!(mean_std(&[1.5]), (1.5, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }

    #[test]
    fn a_verdict_weighs_the_margin_against_the_spread_or_the_close_margin() {
        assert_eq!(verdict(2.5, 0.0, 1, 2.0), "held");
        assert_eq!(verdict(1.9, 0.0, 1, 2.0), UNRESOLVED);
        assert_eq!(verdict(-2.1, 0.0, 1, 2.0), "did not hold");
        assert_eq!(verdict(3.0, 8f64.sqrt(), 2, 2.0), "held");
        assert_eq!(verdict(1.0, 1.5, 2, 2.0), UNRESOLVED);
        assert_eq!(verdict(-1.6, 1.5, 2, 2.0), "did not hold");
        assert_eq!(verdict(f64::NAN, f64::NAN, 0, 2.0), "not measured");
    }

    #[test]
    fn claims_are_signed_sums_of_cells_per_seed() {
        let spec = Plan::Default.spec();
        let mut cells = Cells::default();
        // Seed 0: fine-tuned 70 / 85 / 90, baseline 65 / 85.5 / 91 at 1 / 10 / 100 %.
        for (f, ft, bl) in [(0.01, 70.0, 65.0), (0.1, 85.0, 85.5), (1.0, 90.0, 91.0)] {
            put(&mut cells, 0, ft_cell(16, 3, f), ft);
            put(&mut cells, 0, base_cell(16, f), bl);
        }
        // Seed 1 has the 1 % cells only.
        put(&mut cells, 1, ft_cell(16, 3, 0.01), 66.0);
        put(&mut cells, 1, base_cell(16, 0.01), 65.0);
        let claims = claims(&spec, &cells);
        let by = |t: &str| claims.iter().find(|c| c.text == t).unwrap();
        let one = by("fine-tuned − baseline at 1%");
        assert_eq!(one.margins, vec![(0, 5.0), (1, 1.0)]);
        assert_eq!(one.mean, 3.0);
        assert_eq!(one.verdict, "held");
        let ten = by("fine-tuned − baseline at 10%");
        assert_eq!(ten.margins, vec![(0, -0.5)]);
        assert_eq!(ten.verdict, UNRESOLVED);
        // (70 − 65) − (85 − 85.5) = 5.5; seed 1 lacks the 10 % cells.
        let shrink = by("(fine-tuned − baseline) at 1% − at 10%");
        assert_eq!(shrink.margins, vec![(0, 5.5)]);
        assert_eq!(
            by("(fine-tuned − baseline) at 10% − at 100%").margins,
            vec![(0, 0.5)]
        );
        // Claims without cells are not judged.
        let d = by("self-distilled − its teacher at 1%");
        assert!(d.margins.is_empty());
        assert_eq!(d.verdict, "not measured");
        assert_eq!(claims.iter().filter(|c| c.finding == Finding::B).count(), 2);
        assert_eq!(
            claims.iter().filter(|c| c.finding == Finding::C).count(),
            3 + 4
        );
        assert_eq!(claims.iter().filter(|c| c.finding == Finding::D).count(), 4);
    }

    #[test]
    fn the_grid_holds_every_cell_a_claim_compares_and_reruns_bring_their_teachers() {
        for plan in [Plan::Small, Plan::Default, Plan::Full] {
            let spec = plan.spec();
            let grid = grid(&spec);
            let claims = claims(&spec, &Cells::default());
            for c in &claims {
                for (cell, _) in &c.terms {
                    assert!(grid.contains(cell), "{plan:?}: {cell} of {:?}", c.text);
                }
            }
            // The widths, depths and fractions of the grid: 3 pretrainings at depth 3, two
            // more heads; 3 × 3 fine-tunings, 3 baselines, 3 encoder fine-tunings, 2 × 2 more
            // heads, 2 + 2 distillations.
            assert_eq!(grid.len(), 5 + 9 + 3 + 3 + 4 + 4, "{plan:?}");
            let (main, small) = (spec.widths[2], spec.widths[0]);
            let d = claims
                .iter()
                .find(|c| c.text.starts_with(&format!("width {small} distilled")))
                .unwrap();
            let rerun = cells_of(&spec, &[d]);
            assert!(
                rerun.contains(&ft_cell(main, MAIN_DEPTH, 0.01)),
                "{rerun:?}"
            );
            assert!(rerun.contains(&ft_cell(small, MAIN_DEPTH, 0.01)));
            assert!(rerun.contains(&big_small_cell(main, small, 0.01)));
            assert_eq!(rerun.len(), 3);
        }
    }

    #[test]
    fn a_chosen_finding_runs_only_its_cells() {
        let spec = Plan::Default.spec();
        let (main, small) = (spec.widths[2], spec.widths[0]);
        let all = [Finding::A, Finding::B, Finding::C, Finding::D];
        assert_eq!(first_seed_cells(&spec, &all), grid(&spec));
        // (d): the two distillations per fraction, the teacher and the small student's start.
        let d = first_seed_cells(&spec, &[Finding::D]);
        let mut want = BTreeSet::new();
        for f in [0.01, 0.1] {
            want.insert(self_cell(main, f));
            want.insert(big_small_cell(main, small, f));
            want.insert(ft_cell(main, MAIN_DEPTH, f));
            want.insert(ft_cell(small, MAIN_DEPTH, f));
        }
        assert_eq!(d, want);
        // (b) plots every width, so its middle width runs too; no baseline, no other head.
        let b = first_seed_cells(&spec, &[Finding::B]);
        assert!(b.contains(&ft_cell(spec.widths[1], MAIN_DEPTH, 1.0)));
        assert!(b.contains(&pre_cell(spec.widths[1], MAIN_DEPTH)));
        assert!(!b
            .iter()
            .any(|c| c.starts_with("baseline") || c.contains("/h2/")));
        // (a) charts the self-distilled network beside the baseline and the fine-tuned one.
        let a = first_seed_cells(&spec, &[Finding::A]);
        assert!(a.contains(&self_cell(main, 0.01)) && a.contains(&base_cell(main, 1.0)));
        assert!(!a
            .iter()
            .any(|c| c.contains("-to-") || c.contains("/encoder/")));
        let args = study_args(&["--finding", "d", "--finding", "b"]);
        assert_eq!(args.findings, [Finding::D, Finding::B]);
    }

    #[test]
    fn the_main_network_is_the_pipelines_so_a_pipeline_run_is_reused() {
        let args = study_args(&["--plan", "default"]);
        let study = Study {
            args: &args,
            spec: args.plan.spec(),
            dataset: "fashion-mnist-subset".into(),
            image_size: 28,
        };
        let splits = vec![vec![0; 100], vec![0; 1000], vec![0; 10000]];
        let cfg = study.config(16, MAIN_DEPTH, 0, &splits).unwrap();
        let mut pipe = PipelineConfig::new(
            Preset::Default,
            "fashion-mnist-subset",
            28,
            &[0.01, 0.1],
            None,
            0,
        )
        .unwrap();
        pipe.size_labelled_stages(&[100, 1000]);
        assert_eq!(cfg.run_name(), pipe.run_name());
        for k in 0..2 {
            for (a, b) in [
                (&cfg.finetune[k], &pipe.finetune[k]),
                (&cfg.baseline[k], &pipe.baseline[k]),
            ] {
                assert_eq!(
                    serde_json::to_value(a).unwrap(),
                    serde_json::to_value(b).unwrap(),
                    "fraction {k}"
                );
            }
        }
        // All the labels: the baseline's recipe, capped at the plan's step count.
        assert_eq!(cfg.finetune[2].training.schedule.train_steps, Some(782));
        assert_eq!(cfg.baseline[2].training.schedule.train_steps, Some(782));
        assert_eq!(cfg.baseline[2].training.train_batch_size, 128);
        // Another head is another pretraining.
        let h2 = study.config(16, 2, 0, &splits).unwrap();
        assert_eq!(h2.pretrain.model.num_proj_layers, 2);
        assert_ne!(h2.run_name(), cfg.run_name());
        // The user's settings reach every network, after the sizing.
        let args = study_args(&["--set", "finetune.*.schedule.train_steps=7"]);
        let study = Study {
            args: &args,
            spec: args.plan.spec(),
            dataset: "fashion-mnist-subset".into(),
            image_size: 28,
        };
        let cfg = study.config(4, MAIN_DEPTH, 0, &splits).unwrap();
        assert!(cfg
            .finetune
            .iter()
            .all(|f| f.training.schedule.train_steps == Some(7)));
        assert_eq!(cfg.pretrain.model.base_width, 4);
    }
}
