//! The full SimCLRv2 network: ResNet encoder, projection head and supervised head.
//!
//! Variable prefixes: `resnet.`, `projection_head.`, `head_supervised.` (see the modules of
//! each part for the names below them).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use simclr_collective::Collective;

use crate::batch_norm::BnMode;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::heads::{ProjectionHead, SupervisedHead};
use crate::init::SeededInit;
use crate::precision::Precision;
use crate::resnet::{ResNet, ResNetEndpoints};
use simclr_kernels::conv::Products;

/// How to run a forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions<'a> {
    /// Training mode: BN uses (and updates) batch statistics outside the frozen parts.
    pub train: bool,
    /// Detach the supervised head's input, as the official online linear probe does during
    /// pretraining (`lineareval_while_pretraining`): the head learns, the encoder and the
    /// projection head get no gradient from it.
    pub stop_gradient_supervised_input: bool,
    /// Keep the autograd graph through the encoder in an inference pass. By default an
    /// inference pass detaches every block's output (so memory stays at about one block's
    /// activations) and gives no gradient to the encoder; training passes always keep it
    /// outside the frozen parts.
    pub keep_graph: bool,
    /// Global BN: in training mode, compute BN statistics over the batches of every replica
    /// of this collective (the official `global_bn`); `None` is this replica's batch alone.
    pub replicas: Option<&'a dyn Collective>,
}

impl ForwardOptions<'_> {
    /// Training (`true`) or inference mode, nothing else.
    pub fn mode(train: bool) -> Self {
        Self {
            train,
            ..Self::default()
        }
    }
}

impl<'a> ForwardOptions<'a> {
    /// The BN mode these options select.
    pub fn bn_mode(&self) -> BnMode<'a> {
        BnMode {
            train: self.train,
            replicas: self.replicas,
        }
    }
}

/// Half-precision outputs in f32 (losses and metrics are computed in f32); other dtypes as
/// they are.
fn f32_out(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::BF16 | DType::F16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// What one forward pass produces.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// Encoder output, `[N, feature_dim]` (`final_avg_pool`).
    pub final_avg_pool: Tensor,
    /// `hiddens_list`: `[0]` is the head input (= `final_avg_pool`), `[j]` the output of
    /// projection-head layer `j - 1`; the last entry is `proj_head_output`.
    pub hiddens: Vec<Tensor>,
    /// Output of the projection head (`hiddens.last()`).
    pub proj_head_output: Tensor,
    /// `hiddens[ft_proj_selector]`, the supervised head's input (detached if asked).
    pub supervised_input: Tensor,
    /// Output of the supervised head, when the model has one.
    pub logits_sup: Option<Tensor>,
}

impl ModelOutput {
    /// An output by name: `final_avg_pool`, `proj_head_input`, `proj_head_N` (`hiddens[N]`),
    /// `proj_head_output`, `supervised_input`, `logits_sup` (alias `logits`).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        match name {
            "final_avg_pool" => Some(&self.final_avg_pool),
            "proj_head_input" => self.hiddens.first(),
            "proj_head_output" => Some(&self.proj_head_output),
            "supervised_input" => Some(&self.supervised_input),
            "logits_sup" | "logits" => self.logits_sup.as_ref(),
            other => other
                .strip_prefix("proj_head_")
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| self.hiddens.get(i)),
        }
    }
}

/// The SimCLRv2 model.
#[derive(Debug, Clone)]
pub struct SimclrModel {
    config: ModelConfig,
    precision: Precision,
    /// bf16 activations on the CPU too (the GPU's numerics; see [`SimclrModel::with_gpu_bf16_numerics`]).
    gpu_bf16_numerics: bool,
    resnet: ResNet,
    projection_head: ProjectionHead,
    supervised_head: Option<SupervisedHead>,
}

impl SimclrModel {
    /// Builds the model from any `VarBuilder` (a `VarMap`, a safetensors file, ...) after
    /// validating `config`.
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> std::result::Result<Self, ModelError> {
        config.validate()?;
        let resnet = ResNet::new(vb.pp("resnet"), config)?;
        let projection_head = ProjectionHead::new(vb.pp("projection_head"), config)?;
        let supervised_head = match config.num_classes {
            Some(n) => Some(SupervisedHead::new(
                vb.pp("head_supervised"),
                config.supervised_input_dim(),
                n,
            )?),
            None => None,
        };
        Ok(Self {
            config: config.clone(),
            precision: Precision::F32,
            gpu_bf16_numerics: false,
            resnet,
            projection_head,
            supervised_head,
        })
    }

    /// A freshly initialised f32 model whose variables are created in `varmap` with the
    /// official initialisers, drawn from a ChaCha stream seeded with `seed`.
    pub fn init(
        config: &ModelConfig,
        varmap: &VarMap,
        seed: u64,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        config.validate()?;
        Self::new(
            config,
            SeededInit::var_builder(varmap, seed, DType::F32, device),
        )
    }

    /// The same model computing its convolutions and matmuls in `precision`. On the CPU, bf16
    /// keeps the activations in f32 and multiplies the convolutions' operands in bf16 (on AMX
    /// where the CPU has it; see the `precision` module).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self.set_conv_products();
        self
    }

    /// With [`Precision::Bf16`], the GPU's numerics on the CPU as well: bf16 activations, each
    /// product's operands and result rounded to bf16 (through f32 arithmetic; slow). For the
    /// CPU side of a CPU/GPU parity check, which must compute what the GPU computes.
    pub fn with_gpu_bf16_numerics(mut self) -> Self {
        self.gpu_bf16_numerics = true;
        self.set_conv_products();
        self
    }

    fn set_conv_products(&mut self) {
        let products = if self.precision == Precision::Bf16 && !self.bf16_activations() {
            Products::Bf16
        } else {
            Products::F32
        };
        self.resnet.set_conv_products(products);
    }

    /// Whether activations travel in bf16 (bf16 on a GPU; the CPU's bf16 keeps them f32).
    fn bf16_activations(&self) -> bool {
        self.precision == Precision::Bf16 && (self.gpu_bf16_numerics || !self.resnet.is_cpu())
    }

    /// The precision of the products (f32 unless set with [`SimclrModel::with_precision`]).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// `x` in the compute dtype.
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = self.precision.compute_dtype();
        if x.dtype() == dtype || !self.bf16_activations() {
            Ok(x.clone())
        } else {
            x.to_dtype(dtype)
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The encoder.
    pub fn resnet(&self) -> &ResNet {
        &self.resnet
    }

    /// The projection head.
    pub fn projection_head(&self) -> &ProjectionHead {
        &self.projection_head
    }

    /// The supervised head, if any.
    pub fn supervised_head(&self) -> Option<&SupervisedHead> {
        self.supervised_head.as_ref()
    }

    /// Forward pass in training (`train = true`) or inference mode.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<ModelOutput> {
        self.forward_with(x, ForwardOptions::mode(train))
    }

    /// Forward pass with explicit options.
    pub fn forward_with(&self, x: &Tensor, opts: ForwardOptions) -> Result<ModelOutput> {
        let h = self
            .resnet
            .forward_with(&self.input(x)?, opts.bn_mode(), opts.keep_graph)?;
        self.heads(h, opts)
    }

    /// Forward pass that also returns every encoder endpoint.
    pub fn forward_endpoints(
        &self,
        x: &Tensor,
        opts: ForwardOptions,
    ) -> Result<(ResNetEndpoints, ModelOutput)> {
        let e = self
            .resnet
            .forward_endpoints(&self.input(x)?, opts.bn_mode(), opts.keep_graph)?;
        let out = self.heads(e.final_avg_pool.clone(), opts)?;
        Ok((e, out))
    }

    fn heads(&self, h: Tensor, opts: ForwardOptions) -> Result<ModelOutput> {
        let hiddens = self.projection_head.forward(&h, opts.bn_mode())?;
        let proj_head_output = match hiddens.last() {
            Some(t) => t.clone(),
            None => candle_core::bail!("empty hiddens list"),
        };
        let idx = self.config.supervised_input_index();
        let mut supervised_input = match hiddens.get(idx) {
            Some(t) => t.clone(),
            None => candle_core::bail!("ft_proj_selector {idx} out of range"),
        };
        if opts.stop_gradient_supervised_input {
            supervised_input = supervised_input.detach();
        }
        let logits_sup = match &self.supervised_head {
            Some(head) => Some(f32_out(&head.forward(&supervised_input)?)?),
            None => None,
        };
        Ok(ModelOutput {
            final_avg_pool: f32_out(&h)?,
            hiddens: hiddens.iter().map(f32_out).collect::<Result<_>>()?,
            proj_head_output: f32_out(&proj_head_output)?,
            supervised_input: f32_out(&supervised_input)?,
            logits_sup,
        })
    }
}
