//! # simclr-distill
//!
//! Owns SimCLRv2's third stage (the SimCLRv2 paper's distillation): a fixed teacher (the fine-tuned network) labels
//! the unlabeled images, on the fly on the very augmented view the student sees (the official
//! colab) or once on the clean images (`TeacherTargets::Clean`), and the student
//! minimises `−Σ_y P_T(y|x;τ) log P_S(y|x;τ)`; optionally with the τ² factor of the official
//! colab and a labelled term. Self-distillation (student = the teacher's architecture, τ = 0.1)
//! and big-to-small (a smaller student, τ = 1.0).
//!
//! It does not own the training loop, optimizers or checkpoints (`simclr-train`,
//! `simclr-models`), the data (`simclr-data`) or evaluation (`simclr-eval`).

mod distill;
mod loss;

pub use distill::{
    run_distill, DistillConfig, DistillTask, StudentInit, TeacherTargets, MAX_CLEAN_TARGET_BYTES,
};
pub use loss::distillation_loss;
