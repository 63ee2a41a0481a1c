//! The stages that write checkpoints, by name.
//!
//! A checkpoint records the stage that wrote it as a string (the file format stays open to
//! names this crate does not know); the code that decides what a checkpoint may be used for
//! goes through [`Stage`], so a misspelt name cannot pass a check.

use std::fmt;
use std::str::FromStr;

/// A stage of the SimCLRv2 pipeline, or how a model entered or left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Contrastive pretraining.
    Pretrain,
    /// Supervised fine-tuning of a pretrained network.
    Finetune,
    /// A linear classifier on a frozen pretrained network.
    LinearEval,
    /// Supervised training from random weights (the pipeline's baseline).
    Supervised,
    /// Distillation of a fine-tuned teacher into a student.
    Distill,
    /// Weights imported from the official checkpoints or the converter's files.
    Import,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 6] = [
        Stage::Pretrain,
        Stage::Finetune,
        Stage::LinearEval,
        Stage::Supervised,
        Stage::Distill,
        Stage::Import,
    ];

    /// The stages whose checkpoints fine-tuning starts from: a pretrained network.
    pub const PRETRAINED: [Stage; 2] = [Stage::Pretrain, Stage::Import];

    /// The stages whose checkpoints can teach a student: a trained supervised head.
    pub const TEACHERS: [Stage; 2] = [Stage::Finetune, Stage::Supervised];

    /// The name written into checkpoints and used for folders and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pretrain => "pretrain",
            Stage::Finetune => "finetune",
            Stage::LinearEval => "linear_eval",
            Stage::Supervised => "supervised",
            Stage::Distill => "distill",
            Stage::Import => "import",
        }
    }

    /// Whether a checkpoint written by `stage` (a name read from a file) is one of `allowed`.
    pub fn name_in(stage: &str, allowed: &[Stage]) -> bool {
        stage.parse::<Stage>().is_ok_and(|s| allowed.contains(&s))
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Stage> for String {
    fn from(stage: Stage) -> String {
        stage.as_str().to_string()
    }
}

/// A stage name this crate does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown stage {0:?} (one of pretrain, finetune, linear_eval, supervised, distill, import)"
)]
pub struct UnknownStage(pub String);

impl FromStr for Stage {
    type Err = UnknownStage;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.as_str() == s)
            .ok_or_else(|| UnknownStage(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for stage in Stage::ALL {
            assert_eq!(stage.as_str().parse::<Stage>(), Ok(stage));
        }
        assert_eq!(
            "fine-tune".parse::<Stage>(),
            Err(UnknownStage("fine-tune".into()))
        );
        assert!(Stage::name_in("import", &Stage::PRETRAINED));
        assert!(!Stage::name_in("distill", &Stage::PRETRAINED));
        assert!(!Stage::name_in("Finetune", &Stage::TEACHERS));
    }
}
