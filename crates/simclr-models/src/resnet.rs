//! The SimCLRv2 ResNet encoder (the official tf2/resnet.py: stems, blocks, `fine_tune_after_block`).
//!
//! Variable names (under the `resnet` prefix the model uses):
//!
//! * stem: `stem.conv{i}.weight`, `stem.bn{i}.*` (one pair for the standard and CIFAR stems,
//!   three for the ResNet-D deep stem);
//! * blocks: `block_group{g}.block{b}.` followed by `shortcut_conv`, `shortcut_bn` (first block
//!   of each group only) and `conv1`, `bn1`, `conv2`, `bn2` (basic) or `conv1`, `bn1`,
//!   `conv2`/`bn2` or `sk.*` (SK), `conv3`, `bn3` (bottleneck). The last BN of every block has
//!   its gamma initialised to zero.
//!
//! Variables are created in TF1's creation order: the shortcut before the main path.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::batch_norm::{BatchNorm, BatchNormOptions, BnMode};
use crate::config::{BlockKind, ModelConfig, StemKind};
use crate::layers::Conv2d;
use crate::pool::{avg_pool_fixed_valid, avg_pool_same, global_avg_pool, max_pool_same};
use crate::sk::SkConv;
use simclr_kernels::conv::Products;

fn bn_options(config: &ModelConfig) -> BatchNormOptions {
    BatchNormOptions::new(config.batch_norm_epsilon, config.batch_norm_decay)
}

/// The stem: conv(s) + BN-ReLU, then (except for the CIFAR stem) a 3x3/s2 SAME max-pool.
#[derive(Debug, Clone)]
pub struct Stem {
    layers: Vec<(Conv2d, BatchNorm)>,
    max_pool: bool,
    kind: StemKind,
}

/// Intermediate outputs of the stem.
#[derive(Debug, Clone)]
pub struct StemOutput {
    /// Output of the last stem conv, before its BN (`initial_conv`).
    pub initial_conv: Tensor,
    /// Stem output (`initial_max_pool`; for the CIFAR stem the BN-ReLU output).
    pub output: Tensor,
}

impl Stem {
    fn for_each_conv(&mut self, f: &mut dyn FnMut(&mut Conv2d)) {
        self.layers.iter_mut().for_each(|(c, _)| f(c));
    }

    /// Builds the stem chosen by `config.stem_kind()`.
    pub fn new(vb: VarBuilder, config: &ModelConfig) -> Result<Self> {
        let c0 = config.stem_width();
        let cin = config.in_channels;
        let bn = bn_options(config);
        let kind = config.stem_kind();
        // (kernel, stride, in, out) of each conv.
        let specs: Vec<(usize, usize, usize, usize)> = match kind {
            StemKind::Standard => vec![(7, 2, cin, c0)],
            StemKind::Cifar => vec![(3, 1, cin, c0)],
            StemKind::Deep => vec![
                (3, 2, cin, c0 / 2),
                (3, 1, c0 / 2, c0 / 2),
                (3, 1, c0 / 2, c0),
            ],
        };
        let layers = specs
            .into_iter()
            .enumerate()
            .map(|(i, (k, s, ci, co))| {
                let conv = Conv2d::new(vb.pp(format!("conv{i}")), ci, co, k, s)?;
                let norm = BatchNorm::new(vb.pp(format!("bn{i}")), co, bn)?;
                Ok((conv, norm))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            max_pool: kind != StemKind::Cifar,
            kind,
        })
    }

    /// Which stem this is.
    pub fn kind(&self) -> StemKind {
        self.kind
    }

    /// Runs the stem and returns its taps.
    pub fn forward_taps<'a>(&self, x: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<StemOutput> {
        let mode: BnMode = mode.into();
        let mut y = x.clone();
        let mut initial_conv = None;
        let n = self.layers.len();
        for (i, (conv, bn)) in self.layers.iter().enumerate() {
            let c = conv.forward(&y)?;
            if i + 1 == n {
                initial_conv = Some(c.clone());
            }
            y = bn.forward_relu(&c, mode)?;
        }
        if self.max_pool {
            // The windows-based (differentiable) path only where a gradient can flow.
            y = max_pool_same(&y, 3, 2, y.track_op())?;
        }
        let initial_conv = match initial_conv {
            Some(c) => c,
            None => candle_core::bail!("stem without layers"),
        };
        Ok(StemOutput {
            initial_conv,
            output: y,
        })
    }

    /// Runs the stem.
    pub fn forward<'a>(&self, x: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<Tensor> {
        let mode: BnMode = mode.into();
        Ok(self.forward_taps(x, mode)?.output)
    }
}

/// How the projection shortcut pools before its 1x1 conv.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShortcutPool {
    /// Plain shortcut: the 1x1 conv itself carries the stride.
    None,
    /// ResNet-D, stride 1: 2x2/s1 SAME average pool.
    Same,
    /// ResNet-D, stride s > 1: FixedPadding(2) then 2x2/s VALID average pool.
    FixedValid(usize),
}

/// The projection shortcut of the first block of each group.
#[derive(Debug, Clone)]
pub struct Projection {
    pool: ShortcutPool,
    conv: Conv2d,
    bn: BatchNorm,
}

impl Projection {
    fn new(
        vb: &VarBuilder,
        config: &ModelConfig,
        cin: usize,
        cout: usize,
        stride: usize,
    ) -> Result<Self> {
        let (pool, conv_stride) = if config.sk_enabled() {
            if stride > 1 {
                (ShortcutPool::FixedValid(stride), 1)
            } else {
                (ShortcutPool::Same, 1)
            }
        } else {
            (ShortcutPool::None, stride)
        };
        let conv = Conv2d::new(vb.pp("shortcut_conv"), cin, cout, 1, conv_stride)?;
        let bn = BatchNorm::new(vb.pp("shortcut_bn"), cout, bn_options(config))?;
        Ok(Self { pool, conv, bn })
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Result<Tensor> {
        let x = match self.pool {
            ShortcutPool::None => x.clone(),
            ShortcutPool::Same => avg_pool_same(x, 2, 1, x.track_op())?,
            ShortcutPool::FixedValid(s) => avg_pool_fixed_valid(x, 2, s, x.track_op())?,
        };
        self.bn.forward(&self.conv.forward(&x)?, mode)
    }
}

#[derive(Debug, Clone)]
enum Middle {
    Conv(Conv2d, BatchNorm),
    Sk(SkConv),
}

#[derive(Debug, Clone)]
enum MainPath {
    Basic {
        conv1: Conv2d,
        bn1: BatchNorm,
        conv2: Conv2d,
        bn2: BatchNorm,
    },
    Bottleneck {
        conv1: Conv2d,
        bn1: BatchNorm,
        middle: Box<Middle>,
        conv3: Conv2d,
        bn3: BatchNorm,
    },
}

/// One residual block: `relu(main(x) + shortcut(x))`.
#[derive(Debug, Clone)]
pub struct Block {
    projection: Option<Projection>,
    main: MainPath,
}

impl Block {
    fn for_each_conv(&mut self, f: &mut dyn FnMut(&mut Conv2d)) {
        if let Some(p) = &mut self.projection {
            f(&mut p.conv);
        }
        match &mut self.main {
            MainPath::Basic { conv1, conv2, .. } => {
                f(conv1);
                f(conv2);
            }
            MainPath::Bottleneck {
                conv1,
                middle,
                conv3,
                ..
            } => {
                f(conv1);
                match middle.as_mut() {
                    Middle::Conv(c, _) => f(c),
                    Middle::Sk(sk) => sk.for_each_conv(f),
                }
                f(conv3);
            }
        }
    }

    /// Builds block `prefix` with `filters` filters; `projection` adds the projection
    /// shortcut (the first block of a group, always, as in the official code).
    pub fn new(
        vb: VarBuilder,
        config: &ModelConfig,
        cin: usize,
        filters: usize,
        stride: usize,
        projection: bool,
    ) -> Result<Self> {
        let kind = config.block_kind();
        let cout = filters * kind.expansion();
        let bn = bn_options(config);
        let last_bn = bn.zero_init_gamma(true);
        let projection = if projection {
            Some(Projection::new(&vb, config, cin, cout, stride)?)
        } else {
            None
        };
        let main = match kind {
            BlockKind::Basic => MainPath::Basic {
                conv1: Conv2d::new(vb.pp("conv1"), cin, filters, 3, stride)?,
                bn1: BatchNorm::new(vb.pp("bn1"), filters, bn)?,
                conv2: Conv2d::new(vb.pp("conv2"), filters, filters, 3, 1)?,
                bn2: BatchNorm::new(vb.pp("bn2"), filters, last_bn)?,
            },
            BlockKind::Bottleneck => {
                let conv1 = Conv2d::new(vb.pp("conv1"), cin, filters, 1, 1)?;
                let bn1 = BatchNorm::new(vb.pp("bn1"), filters, bn)?;
                let middle = Box::new(if config.sk_enabled() {
                    let mid = config.sk_mid_dim(filters);
                    Middle::Sk(SkConv::new(vb.pp("sk"), filters, filters, stride, mid, bn)?)
                } else {
                    Middle::Conv(
                        Conv2d::new(vb.pp("conv2"), filters, filters, 3, stride)?,
                        BatchNorm::new(vb.pp("bn2"), filters, bn)?,
                    )
                });
                MainPath::Bottleneck {
                    conv1,
                    bn1,
                    middle,
                    conv3: Conv2d::new(vb.pp("conv3"), filters, cout, 1, 1)?,
                    bn3: BatchNorm::new(vb.pp("bn3"), cout, last_bn)?,
                }
            }
        };
        Ok(Self { projection, main })
    }

    /// The shortcut branch alone (identity for blocks without projection).
    pub fn shortcut<'a>(&self, x: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<Tensor> {
        let mode: BnMode = mode.into();
        match &self.projection {
            Some(p) => p.forward(x, mode),
            None => Ok(x.clone()),
        }
    }

    /// The residual branch alone (ends with the zero-initialised BN, no ReLU).
    pub fn residual<'a>(&self, x: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<Tensor> {
        let mode: BnMode = mode.into();
        let (last_bn, pre) = self.residual_parts(x, mode)?;
        last_bn.forward(&pre, mode)
    }

    /// The residual branch up to its last BN: that BN and its input.
    fn residual_parts(&self, x: &Tensor, mode: BnMode) -> Result<(&BatchNorm, Tensor)> {
        match &self.main {
            MainPath::Basic {
                conv1,
                bn1,
                conv2,
                bn2,
            } => {
                let y = bn1.forward_relu(&conv1.forward(x)?, mode)?;
                Ok((bn2, conv2.forward(&y)?))
            }
            MainPath::Bottleneck {
                conv1,
                bn1,
                middle,
                conv3,
                bn3,
            } => {
                let y = bn1.forward_relu(&conv1.forward(x)?, mode)?;
                let y = match middle.as_ref() {
                    Middle::Conv(conv, bn) => bn.forward_relu(&conv.forward(&y)?, mode)?,
                    Middle::Sk(sk) => sk.forward(&y, mode)?,
                };
                Ok((bn3, conv3.forward(&y)?))
            }
        }
    }

    /// `relu(residual(x) + shortcut(x))`, the last BN, the addition and the ReLU fused.
    pub fn forward<'a>(&self, x: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<Tensor> {
        let mode: BnMode = mode.into();
        let sc = self.shortcut(x, mode)?;
        let (last_bn, pre) = self.residual_parts(x, mode)?;
        last_bn.forward_add_relu(&pre, &sc, mode)
    }
}

/// A stage of blocks (`block_group{g}`).
#[derive(Debug, Clone)]
pub struct BlockGroup {
    blocks: Vec<Block>,
}

impl BlockGroup {
    /// Builds stage `stage` (0-based).
    pub fn new(vb: VarBuilder, config: &ModelConfig, stage: usize, cin: usize) -> Result<Self> {
        let filters = config.stage_filters(stage);
        let n = config.blocks_per_stage()[stage];
        let cout = config.stage_out_channels(stage);
        let mut blocks = Vec::with_capacity(n);
        for b in 0..n {
            let (ci, stride) = if b == 0 {
                (cin, ModelConfig::stage_stride(stage))
            } else {
                (cout, 1)
            };
            blocks.push(Block::new(
                vb.pp(format!("block{b}")),
                config,
                ci,
                filters,
                stride,
                b == 0,
            )?);
        }
        Ok(Self { blocks })
    }

    /// The blocks of this group.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Runs every block.
    pub fn forward<'a>(&self, x: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<Tensor> {
        let mode: BnMode = mode.into();
        let mut y = x.clone();
        for b in &self.blocks {
            y = b.forward(&y, mode)?;
        }
        Ok(y)
    }
}

/// The SimCLRv2 ResNet encoder.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: Stem,
    groups: Vec<BlockGroup>,
    stem_frozen: bool,
    frozen: [bool; 4],
    in_channels: usize,
}

/// Every endpoint of the encoder (the SavedModel's names).
#[derive(Debug, Clone)]
pub struct ResNetEndpoints {
    /// Last stem conv output, before BN.
    pub initial_conv: Tensor,
    /// Stem output.
    pub initial_max_pool: Tensor,
    /// Outputs of `block_group1..4`.
    pub block_groups: Vec<Tensor>,
    /// Global average of the last group, `[N, feature_dim]`.
    pub final_avg_pool: Tensor,
}

impl ResNet {
    /// Sets the arithmetic of every convolution's products (see [`Conv2d::set_products`]).
    pub fn set_conv_products(&mut self, products: Products) {
        let f = &mut |c: &mut Conv2d| c.set_products(products);
        self.stem.for_each_conv(f);
        for g in &mut self.groups {
            g.blocks.iter_mut().for_each(|b| b.for_each_conv(f));
        }
    }

    /// Whether the encoder's variables live on the CPU.
    pub fn is_cpu(&self) -> bool {
        self.stem.layers[0].0.weight().device().is_cpu()
    }

    /// Builds the encoder under `vb` (the model passes `vb.pp("resnet")`).
    pub fn new(vb: VarBuilder, config: &ModelConfig) -> Result<Self> {
        let stem = Stem::new(vb.pp("stem"), config)?;
        let mut cin = config.stem_width();
        let mut groups = Vec::with_capacity(4);
        for stage in 0..4 {
            groups.push(BlockGroup::new(
                vb.pp(format!("block_group{}", stage + 1)),
                config,
                stage,
                cin,
            )?);
            cin = config.stage_out_channels(stage);
        }
        Ok(Self {
            stem,
            groups,
            stem_frozen: config.stem_frozen(),
            frozen: [0, 1, 2, 3].map(|s| config.stage_frozen(s)),
            in_channels: config.in_channels,
        })
    }

    /// The stem.
    pub fn stem(&self) -> &Stem {
        &self.stem
    }

    /// The four block groups.
    pub fn groups(&self) -> &[BlockGroup] {
        &self.groups
    }

    fn run(
        &self,
        x: &Tensor,
        mode: BnMode,
        keep_graph: bool,
        keep_endpoints: bool,
    ) -> Result<(Tensor, Option<ResNetEndpoints>)> {
        match x.dims4() {
            Ok((_, c, _, _)) if c == self.in_channels => {}
            _ => candle_core::bail!(
                "the encoder expects NCHW input with {} channels, got {:?}",
                self.in_channels,
                x.shape()
            ),
        }
        // Parts that need no gradient (frozen ones, or everything in an inference pass without
        // `keep_graph`) are detached after every block: candle keeps the inputs of each op
        // alive through the autograd graph, so without this an inference pass would hold
        // every activation of the network until its output is dropped.
        let no_graph = !mode.train && !keep_graph;
        let taps = self
            .stem
            .forward_taps(x, mode.unless_frozen(self.stem_frozen))?;
        let mut y = taps.output;
        if self.stem_frozen || no_graph {
            y = y.detach();
        }
        let initial_max_pool = if keep_endpoints {
            Some(y.clone())
        } else {
            None
        };
        let mut groups_out = Vec::new();
        for (group, frozen) in self.groups.iter().zip(self.frozen) {
            for block in group.blocks() {
                y = block.forward(&y, mode.unless_frozen(frozen))?;
                if frozen || no_graph {
                    y = y.detach();
                }
            }
            if keep_endpoints {
                groups_out.push(y.clone());
            }
        }
        let pooled = global_avg_pool(&y)?;
        let endpoints = match initial_max_pool {
            Some(imp) => Some(ResNetEndpoints {
                initial_conv: taps.initial_conv,
                initial_max_pool: imp,
                block_groups: groups_out,
                final_avg_pool: pooled.clone(),
            }),
            None => None,
        };
        Ok((pooled, endpoints))
    }

    /// `final_avg_pool` of `x` (`[N, C, H, W]`, values in [0, 1] for the official weights).
    /// Frozen parts (`fine_tune_after_block`) run BN in inference mode and are detached. An
    /// inference pass (`mode` not training) builds no autograd graph through the encoder; use
    /// [`ResNet::forward_with`] with `keep_graph` to differentiate one.
    pub fn forward<'a>(&self, x: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<Tensor> {
        let mode: BnMode = mode.into();
        Ok(self.run(x, mode, false, false)?.0)
    }

    /// Like [`ResNet::forward`]; `keep_graph` keeps the autograd graph of an inference pass.
    pub fn forward_with<'a>(
        &self,
        x: &Tensor,
        mode: impl Into<BnMode<'a>>,
        keep_graph: bool,
    ) -> Result<Tensor> {
        let mode: BnMode = mode.into();
        Ok(self.run(x, mode, keep_graph, false)?.0)
    }

    /// Like [`ResNet::forward_with`], keeping every endpoint.
    pub fn forward_endpoints<'a>(
        &self,
        x: &Tensor,
        mode: impl Into<BnMode<'a>>,
        keep_graph: bool,
    ) -> Result<ResNetEndpoints> {
        let mode: BnMode = mode.into();
        match self.run(x, mode, keep_graph, true)?.1 {
            Some(e) => Ok(e),
            None => candle_core::bail!("endpoints were not kept"),
        }
    }
}
