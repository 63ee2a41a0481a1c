//! Parameter groups, the variable layout of a configuration, and parameter counts.
//!
//! The official LARS optimizer excludes variables from weight decay and from the trust ratio by
//! a regex search of their names for `batch_normalization`, `bias` and `head_supervised`
//! (the official tf2/model.py and lars_optimizer.py). Here the group of each variable is an explicit table over this
//! crate's names, [`param_group`].

use candle_core::DType;

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::init::{NamedShape, ShapeRecorder};
use crate::model::SimclrModel;

/// What kind of variable a name denotes, for optimizers and regularisers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamGroup {
    /// Conv kernels and projection-head dense kernels: weight decay and LARS adaptation.
    Adapted,
    /// BN `gamma` and `beta`: no weight decay, no adaptation.
    BatchNorm,
    /// Biases (including `head_supervised.bias`): no weight decay, no adaptation.
    Bias,
    /// `head_supervised.weight`: excluded from LARS; the official code adds its L2 to the loss.
    SupervisedHead,
    /// BN `moving_mean` / `moving_variance`: state, not trained.
    RunningStat,
}

impl ParamGroup {
    /// Whether an optimizer should update this variable.
    pub fn is_trainable(self) -> bool {
        self != ParamGroup::RunningStat
    }

    /// Whether the official LARS excludes it from weight decay and layer adaptation.
    pub fn lars_excluded(self) -> bool {
        self != ParamGroup::Adapted
    }

    /// Whether the official code adds `wd * l2_loss(w)` for it to the loss
    /// (`head_supervised` non-bias variables).
    pub fn l2_in_loss(self) -> bool {
        self == ParamGroup::SupervisedHead
    }
}

/// The group of the variable `name` (a name of this crate's layout). Unknown names default to
/// [`ParamGroup::Adapted`] unless their last segment says otherwise.
pub fn param_group(name: &str) -> ParamGroup {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    match leaf {
        "moving_mean" | "moving_variance" => ParamGroup::RunningStat,
        "gamma" | "beta" => ParamGroup::BatchNorm,
        "bias" => ParamGroup::Bias,
        _ if name.starts_with("head_supervised.") => ParamGroup::SupervisedHead,
        _ => ParamGroup::Adapted,
    }
}

/// Name and shape of every variable of a configuration, in creation order, without allocating
/// the model.
pub fn parameter_shapes(config: &ModelConfig) -> Result<Vec<NamedShape>, ModelError> {
    let rec = ShapeRecorder::new();
    SimclrModel::new(config, rec.var_builder(DType::F32))?;
    Ok(rec.shapes())
}

/// Parameter counts of one configuration, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParameterCount {
    /// Trainable variables of the encoder (conv kernels, BN gamma/beta).
    pub resnet: usize,
    /// BN moving statistics of the encoder.
    pub resnet_stats: usize,
    /// Trainable variables of the projection head.
    pub projection_head: usize,
    /// BN moving statistics of the projection head.
    pub projection_head_stats: usize,
    /// Trainable variables of the supervised head.
    pub supervised_head: usize,
}

impl ParameterCount {
    /// All trainable variables.
    pub fn trainable(&self) -> usize {
        self.resnet + self.projection_head + self.supervised_head
    }

    /// Every variable of the encoder, moving statistics included. This is what the official
    /// README's "params" column counts: it matches all 13 released models to the nearest
    /// million, while the trainable encoder variables alone give 232M instead of 233M for
    /// R152 2x SK0 (the tests check both).
    pub fn encoder_variables(&self) -> usize {
        self.resnet + self.resnet_stats
    }
}

/// Counts the variables of `config` by part, from the layer shapes (nothing is allocated).
pub fn num_parameters(config: &ModelConfig) -> Result<ParameterCount, ModelError> {
    let mut count = ParameterCount::default();
    for (name, shape) in parameter_shapes(config)? {
        let n: usize = shape.iter().product();
        let stat = !param_group(&name).is_trainable();
        let slot = if name.starts_with("resnet.") {
            if stat {
                &mut count.resnet_stats
            } else {
                &mut count.resnet
            }
        } else if name.starts_with("projection_head.") {
            if stat {
                &mut count.projection_head_stats
            } else {
                &mut count.projection_head
            }
        } else {
            &mut count.supervised_head
        };
        *slot += n;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_the_official_exclusions() {
        use ParamGroup::*;
        let cases = [
            ("resnet.stem.conv0.weight", Adapted),
            ("resnet.block_group1.block0.sk.mix_expand.weight", Adapted),
            ("projection_head.nl_0.dense.weight", Adapted),
            ("resnet.stem.bn0.gamma", BatchNorm),
            ("projection_head.nl_1.bn.beta", BatchNorm),
            ("resnet.block_group4.block2.bn3.moving_mean", RunningStat),
            ("projection_head.nl_2.bn.moving_variance", RunningStat),
            ("head_supervised.weight", SupervisedHead),
            ("head_supervised.bias", Bias),
        ];
        for (name, group) in cases {
            assert_eq!(param_group(name), group, "{name}");
        }
        assert!(SupervisedHead.l2_in_loss() && !Bias.l2_in_loss());
        assert!(
            SupervisedHead.lars_excluded() && Bias.lars_excluded() && BatchNorm.lars_excluded()
        );
        assert!(!Adapted.lars_excluded());
        assert!(!RunningStat.is_trainable() && BatchNorm.is_trainable());
    }

    #[test]
    fn every_variable_of_a_model_has_a_sensible_group() {
        let c = ModelConfig {
            base_width: 4,
            sk_ratio: crate::config::SK1_RATIO,
            num_classes: Some(10),
            ..ModelConfig::default()
        };
        for (name, shape) in parameter_shapes(&c).unwrap() {
            let g = param_group(&name);
            match g {
                ParamGroup::Adapted | ParamGroup::SupervisedHead => {
                    assert!(shape.len() >= 2, "{name}")
                }
                _ => assert_eq!(shape.len(), 1, "{name}"),
            }
        }
    }
}
