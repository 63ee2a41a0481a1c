//! # simclr
//!
//! The command line of simclr-rs (`simclr pipeline | pretrain | finetune | distill | eval | embed
//! | import | export`) and the end-to-end pipeline behind `simclr pipeline` and `cargo xtask
//! pipeline` (with its report). It owns argument parsing and reporting only: every
//! stage's logic lives in its crate (`simclr-pretrain`, `simclr-eval`, `simclr-models`, …).

pub mod args;
pub mod charts;
pub mod device_check;
pub mod launch;
pub mod pipeline;
pub mod pipeline_cli;
pub mod report;
pub mod study;

/// The frame of the binaries: tunes the allocator for training ([`simclr_bench::tune_allocator`]),
/// logs to stderr (`RUST_LOG`, default `info`; colours only on a
/// terminal), runs `run`, and reports an error on one line with exit status 1 (no backtrace).
pub fn main_with(run: impl FnOnce() -> anyhow::Result<()>) {
    simclr_bench::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run() {
        // The whole chain, backtraces included, for `RUST_LOG=debug`.
        tracing::debug!("{e:?}");
        eprintln!("error: {}", error_report(&e));
        std::process::exit(1);
    }
}

/// The command line with the official code's flag spellings accepted: `--train_batch_size=4096`
/// (as the official README writes it) becomes `--train-batch-size=4096`. Only a flag's name is
/// rewritten, never its value, and nothing after a bare `--`.
pub fn official_spellings(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let mut rest_is_positional = false;
    args.into_iter()
        .map(|a| {
            if rest_is_positional {
                return a;
            }
            let Some(s) = a.to_str() else { return a };
            if s == "--" {
                rest_is_positional = true;
                return a;
            }
            let Some(flag) = s.strip_prefix("--") else {
                return a;
            };
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (flag, None),
            };
            if !name.contains('_') {
                return a;
            }
            let name = name.replace('_', "-");
            match value {
                Some(v) => format!("--{name}={v}").into(),
                None => format!("--{name}").into(),
            }
        })
        .collect()
}

/// An error and its causes on one line, each cause once: library errors often already quote
/// their source (`file: No such file or directory`), which `{:#}` would print twice. Only the
/// first line of each is kept: with `RUST_BACKTRACE` set, candle's errors carry their backtrace
/// in their message.
pub fn error_report(e: &anyhow::Error) -> String {
    let first_line = |m: String| m.lines().next().unwrap_or_default().trim_end().to_string();
    let mut out = first_line(e.to_string());
    for cause in e.chain().skip(1) {
        let c = first_line(cause.to_string());
        if !c.is_empty() && !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn official_flag_spellings_become_the_kebab_case_ones() {
        let args = [
            "simclr",
            "pretrain",
            "--train_batch_size=4096",
            "--learning_rate",
            "0.3",
            "--out",
            "my_run_dir",
            "--data-dir=/x/with_underscore",
            "--",
            "--not_a_flag",
        ];
        let out: Vec<String> = super::official_spellings(args.iter().map(Into::into))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            out,
            [
                "simclr",
                "pretrain",
                "--train-batch-size=4096",
                "--learning-rate",
                "0.3",
                "--out",
                "my_run_dir",
                "--data-dir=/x/with_underscore",
                "--",
                "--not_a_flag"
            ]
        );
    }

    #[test]
    fn an_error_report_is_one_line_even_with_a_backtrace_in_a_message() {
        let inner = std::io::Error::other("disk on fire\nstack backtrace:\n   0: main");
        let e = anyhow::Error::new(inner).context("run/checkpoint.safetensors: cannot write");
        assert_eq!(
            super::error_report(&e),
            "run/checkpoint.safetensors: cannot write: disk on fire"
        );
    }
}
