//! The distillation objective.

use candle_core::{Result, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};

/// `mean_x −Σ_y softmax(t/τ)_y · log_softmax(s/τ)_y`, times τ² when `tau_squared` (Hinton's
/// scaling, which the official colab applies and the paper's equation does not show).
/// The teacher's logits carry no gradient.
pub fn distillation_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    temperature: f64,
    tau_squared: bool,
) -> Result<Tensor> {
    let p_t = softmax(&(teacher_logits.detach() / temperature)?, D::Minus1)?;
    let log_p_s = log_softmax(&(student_logits / temperature)?, D::Minus1)?;
    let per_image = (p_t * log_p_s)?.sum(D::Minus1)?.neg()?;
    let loss = per_image.mean_all()?;
    if tau_squared {
        loss * (temperature * temperature)
    } else {
        Ok(loss)
    }
}
