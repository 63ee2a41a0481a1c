//! ONNX export of the eval-mode network (BN with its moving statistics), opset 17.
//!
//! The graph is built from the configuration and the variables by the same walk as
//! [`simclr_models::ResNet`] and [`simclr_models::ProjectionHead`]: each conv keeps its symmetric
//! `(k-1)/2` padding, the stem's 3x3/s2 max-pool and the ResNet-D 2x2/s1 average pool are TF `SAME`
//! (ONNX `SAME_UPPER`, the average excluding the padding), the ResNet-D stride-2 pool pads one zero
//! row and column at the end and counts them, and the SK mixing softmax over two streams is written
//! as `sigmoid(a - b)`, which is the same function. Input `images` (`[batch, in_channels, height,
//! width]`, f32 in [0, 1]); outputs named as `simclr embed`'s layers: `final_avg_pool`,
//! `proj_head_1` … (the head's hidden layers), `proj_head_output` and, with a supervised head,
//! `logits_sup` (fed from `hiddens[ft_proj_selector]`).
//!
//! The protobuf is written by hand (field numbers from `onnx.proto`), so no ONNX or protobuf
//! crate is needed.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarMap;

use crate::error::InteropError;
use simclr_models::{BlockKind, ModelConfig, ProjHeadMode, StemKind};

/// The opset the graph is written for.
pub const OPSET: i64 = 17;
/// ONNX IR version 8 (ONNX 1.10+, what opset 17 runtimes read).
const IR_VERSION: i64 = 8;

/// Protobuf wire encoding: varints and length-delimited fields.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }
    fn int(&mut self, field: u32, v: i64) {
        self.key(field, 0);
        self.varint(v as u64);
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }
    fn msg(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }
    fn float(&mut self, field: u32, v: f32) {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

/// An attribute of a node.
enum Attr {
    Int(&'static str, i64),
    Ints(&'static str, Vec<i64>),
    Float(&'static str, f32),
    Str(&'static str, &'static str),
}

impl Attr {
    // AttributeProto: name 1, f 2, i 3, s 4, ints 8, type 20 (FLOAT 1, INT 2, STRING 3, INTS 7).
    fn encode(&self) -> Pb {
        let mut a = Pb::default();
        match self {
            Attr::Int(name, v) => {
                a.str(1, name);
                a.int(3, *v);
                a.int(20, 2);
            }
            Attr::Ints(name, v) => {
                a.str(1, name);
                for x in v {
                    a.int(8, *x);
                }
                a.int(20, 7);
            }
            Attr::Float(name, v) => {
                a.str(1, name);
                a.float(2, *v);
                a.int(20, 1);
            }
            Attr::Str(name, v) => {
                a.str(1, name);
                a.str(4, v);
                a.int(20, 3);
            }
        }
        a
    }
}

struct Graph<'a> {
    path: &'a Path,
    vars: BTreeMap<String, Tensor>,
    eps: f32,
    nodes: Vec<Pb>,
    initializers: Vec<Pb>,
    count: usize,
}

impl Graph<'_> {
    fn fail(&self, reason: String) -> InteropError {
        InteropError::Unsupported {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    // TensorProto: dims 1, data_type 2 (FLOAT 1, INT64 7), name 8, raw_data 9.
    fn raw_initializer(&mut self, name: &str, dims: &[usize], data_type: i64, raw: Vec<u8>) {
        let mut t = Pb::default();
        for &d in dims {
            t.int(1, d as i64);
        }
        t.int(2, data_type);
        t.str(8, name);
        t.bytes(9, &raw);
        self.initializers.push(t);
    }

    /// The variable `name` as an initializer of the same name.
    fn var(&mut self, name: &str) -> Result<String, InteropError> {
        let t = self
            .vars
            .get(name)
            .ok_or_else(|| self.fail(format!("the model has no variable `{name}`")))?;
        let raw = crate::export::f32_le_bytes(t).map_err(|source| InteropError::Candle {
            path: self.path.to_path_buf(),
            source,
        })?;
        let dims = t.dims().to_vec();
        self.raw_initializer(name, &dims, 1, raw);
        Ok(name.to_string())
    }

    fn zeros(&mut self, name: &str, n: usize) -> String {
        self.raw_initializer(name, &[n], 1, vec![0u8; 4 * n]);
        name.to_string()
    }

    fn int64s(&mut self, name: &str, values: &[i64]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.raw_initializer(name, &[values.len()], 7, raw);
        name.to_string()
    }

    // NodeProto: input 1, output 2, name 3, op_type 4, attribute 5.
    fn node_outputs(&mut self, op: &str, inputs: &[&str], outputs: &[String], attrs: Vec<Attr>) {
        self.count += 1;
        let mut n = Pb::default();
        for i in inputs {
            n.str(1, i);
        }
        for o in outputs {
            n.str(2, o);
        }
        n.str(3, &format!("{op}_{}", self.count));
        n.str(4, op);
        for a in attrs {
            n.msg(5, a.encode());
        }
        self.nodes.push(n);
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<Attr>) -> String {
        let out = format!("t{}", self.count + 1);
        self.node_outputs(op, inputs, std::slice::from_ref(&out), attrs);
        out
    }

    fn conv(&mut self, x: &str, prefix: &str, stride: usize) -> Result<String, InteropError> {
        let w = self.var(&format!("{prefix}.weight"))?;
        let k = self.vars[&w].dim(2).unwrap_or(1) as i64;
        let p = (k - 1) / 2;
        Ok(self.node(
            "Conv",
            &[x, &w],
            vec![
                Attr::Ints("kernel_shape", vec![k, k]),
                Attr::Ints("strides", vec![stride as i64; 2]),
                Attr::Ints("pads", vec![p; 4]),
            ],
        ))
    }

    fn bn(&mut self, x: &str, prefix: &str, relu: bool) -> Result<String, InteropError> {
        let gamma = self.var(&format!("{prefix}.gamma"))?;
        let n = self.vars[&gamma].elem_count();
        let beta_name = format!("{prefix}.beta");
        let beta = if self.vars.contains_key(&beta_name) {
            self.var(&beta_name)?
        } else {
            // A BN without beta (the projection head's last) adds nothing.
            self.zeros(&beta_name, n)
        };
        let mean = self.var(&format!("{prefix}.moving_mean"))?;
        let var = self.var(&format!("{prefix}.moving_variance"))?;
        let eps = self.eps;
        let y = self.node(
            "BatchNormalization",
            &[x, &gamma, &beta, &mean, &var],
            vec![Attr::Float("epsilon", eps)],
        );
        Ok(if relu {
            self.node("Relu", &[&y], vec![])
        } else {
            y
        })
    }

    fn dense(&mut self, x: &str, prefix: &str, bias: bool) -> Result<String, InteropError> {
        let w = self.var(&format!("{prefix}.weight"))?;
        let attrs = vec![Attr::Int("transB", 1)];
        Ok(if bias {
            let b = self.var(&format!("{prefix}.bias"))?;
            self.node("Gemm", &[x, &w, &b], attrs)
        } else {
            self.node("Gemm", &[x, &w], attrs)
        })
    }

    fn sk(&mut self, x: &str, p: &str, f: usize, stride: usize) -> Result<String, InteropError> {
        let y = self.conv(x, &format!("{p}.conv"), stride)?;
        let y = self.bn(&y, &format!("{p}.bn"), true)?;
        let halves = self.int64s(&format!("{p}.halves"), &[f as i64, f as i64]);
        let (a, b) = self.split(&y, &halves);
        let s = self.node("Add", &[&a, &b], vec![]);
        let g = self.node("GlobalAveragePool", &[&s], vec![]);
        let g = self.conv(&g, &format!("{p}.mix_reduce"), 1)?;
        let g = self.bn(&g, &format!("{p}.mix_bn"), true)?;
        let m = self.conv(&g, &format!("{p}.mix_expand"), 1)?;
        let (m0, m1) = self.split(&m, &halves);
        let d0 = self.node("Sub", &[&m0, &m1], vec![]);
        let d1 = self.node("Sub", &[&m1, &m0], vec![]);
        let w0 = self.node("Sigmoid", &[&d0], vec![]);
        let w1 = self.node("Sigmoid", &[&d1], vec![]);
        let a = self.node("Mul", &[&a, &w0], vec![]);
        let b = self.node("Mul", &[&b, &w1], vec![]);
        Ok(self.node("Add", &[&a, &b], vec![]))
    }

    fn split(&mut self, x: &str, halves: &str) -> (String, String) {
        let k = self.count + 1;
        let outs = [format!("t{k}a"), format!("t{k}b")];
        self.node_outputs("Split", &[x, halves], &outs, vec![Attr::Int("axis", 1)]);
        let [a, b] = outs;
        (a, b)
    }

    fn block(
        &mut self,
        x: &str,
        config: &ModelConfig,
        q: &str,
        filters: usize,
        stride: usize,
        projection: bool,
    ) -> Result<String, InteropError> {
        let shortcut = if projection {
            let pooled = match (config.sk_enabled(), stride) {
                (false, _) => x.to_string(),
                (true, 1) => self.node(
                    "AveragePool",
                    &[x],
                    vec![
                        Attr::Ints("kernel_shape", vec![2, 2]),
                        Attr::Ints("strides", vec![1, 1]),
                        Attr::Str("auto_pad", "SAME_UPPER"),
                        Attr::Int("count_include_pad", 0),
                    ],
                ),
                (true, s) => self.node(
                    "AveragePool",
                    &[x],
                    vec![
                        Attr::Ints("kernel_shape", vec![2, 2]),
                        Attr::Ints("strides", vec![s as i64; 2]),
                        Attr::Ints("pads", vec![0, 0, 1, 1]),
                        Attr::Int("count_include_pad", 1),
                    ],
                ),
            };
            let conv_stride = if config.sk_enabled() { 1 } else { stride };
            let c = self.conv(&pooled, &format!("{q}shortcut_conv"), conv_stride)?;
            self.bn(&c, &format!("{q}shortcut_bn"), false)?
        } else {
            x.to_string()
        };
        let residual = match config.block_kind() {
            BlockKind::Basic => {
                let y = self.conv(x, &format!("{q}conv1"), stride)?;
                let y = self.bn(&y, &format!("{q}bn1"), true)?;
                let y = self.conv(&y, &format!("{q}conv2"), 1)?;
                self.bn(&y, &format!("{q}bn2"), false)?
            }
            BlockKind::Bottleneck => {
                let y = self.conv(x, &format!("{q}conv1"), 1)?;
                let y = self.bn(&y, &format!("{q}bn1"), true)?;
                let y = if config.sk_enabled() {
                    self.sk(&y, &format!("{q}sk"), filters, stride)?
                } else {
                    let y = self.conv(&y, &format!("{q}conv2"), stride)?;
                    self.bn(&y, &format!("{q}bn2"), true)?
                };
                let y = self.conv(&y, &format!("{q}conv3"), 1)?;
                self.bn(&y, &format!("{q}bn3"), false)?
            }
        };
        let sum = self.node("Add", &[&residual, &shortcut], vec![]);
        Ok(self.node("Relu", &[&sum], vec![]))
    }
}

// ValueInfoProto: name 1, type 2; TypeProto.tensor_type 1: elem_type 1, shape 2;
// TensorShapeProto.dim 1: dim_value 1, dim_param 2.
fn value_info(name: &str, dims: &[Result<usize, &str>]) -> Pb {
    let mut shape = Pb::default();
    for d in dims {
        let mut dim = Pb::default();
        match d {
            Ok(v) => dim.int(1, *v as i64),
            Err(p) => dim.str(2, p),
        }
        shape.msg(1, dim);
    }
    let mut tensor = Pb::default();
    tensor.int(1, 1);
    tensor.msg(2, shape);
    let mut ty = Pb::default();
    ty.msg(1, tensor);
    let mut v = Pb::default();
    v.str(1, name);
    v.msg(2, ty);
    v
}

/// The names of the graph's outputs for `config`, in order.
pub fn output_names(config: &ModelConfig) -> Vec<String> {
    let n = config.num_head_layers();
    let mut out = vec!["final_avg_pool".to_string()];
    out.extend((1..n).map(|i| format!("proj_head_{i}")));
    // Without a projection head its output is the encoder's, as in the model's forward.
    out.push("proj_head_output".into());
    if config.num_classes.is_some() {
        out.push("logits_sup".into());
    }
    out
}

/// ONNX files are one protobuf message, which parsers refuse above 2 GiB.
const PROTOBUF_LIMIT: usize = (1 << 31) - (1 << 20);

/// Writes the eval-mode network of `config` held in `varmap` to `path` as an ONNX model,
/// atomically.
pub fn export_onnx(path: &Path, config: &ModelConfig, varmap: &VarMap) -> Result<(), InteropError> {
    let vars = crate::export::variables(path, varmap)?;
    let mut g = Graph {
        path,
        vars,
        eps: config.batch_norm_epsilon as f32,
        nodes: Vec::new(),
        initializers: Vec::new(),
        count: 0,
    };
    let mut y = "images".to_string();
    let stem_convs: &[usize] = match config.stem_kind() {
        StemKind::Standard => &[2],
        StemKind::Cifar => &[1],
        StemKind::Deep => &[2, 1, 1],
    };
    for (i, &s) in stem_convs.iter().enumerate() {
        y = g.conv(&y, &format!("resnet.stem.conv{i}"), s)?;
        y = g.bn(&y, &format!("resnet.stem.bn{i}"), true)?;
    }
    if config.stem_kind() != StemKind::Cifar {
        y = g.node(
            "MaxPool",
            &[&y],
            vec![
                Attr::Ints("kernel_shape", vec![3, 3]),
                Attr::Ints("strides", vec![2, 2]),
                Attr::Str("auto_pad", "SAME_UPPER"),
            ],
        );
    }
    for (stage, &n) in config.blocks_per_stage().iter().enumerate() {
        let filters = config.stage_filters(stage);
        for b in 0..n {
            let stride = if b == 0 {
                ModelConfig::stage_stride(stage)
            } else {
                1
            };
            let q = format!("resnet.block_group{}.block{b}.", stage + 1);
            y = g.block(&y, config, &q, filters, stride, b == 0)?;
        }
    }
    let pooled = g.node("GlobalAveragePool", &[&y], vec![]);
    let names = output_names(config);
    let mut hiddens = vec![pooled];
    let layers: Vec<(String, bool)> = match config.proj_head_mode {
        ProjHeadMode::None => Vec::new(),
        ProjHeadMode::Linear => vec![("projection_head.l_0".into(), false)],
        ProjHeadMode::Nonlinear => (0..config.num_proj_layers)
            .map(|j| {
                (
                    format!("projection_head.nl_{j}"),
                    j + 1 < config.num_proj_layers,
                )
            })
            .collect(),
    };
    // The head works on [N, C]: flatten once, after the pool.
    let flat = g.node("Flatten", &[&hiddens[0]], vec![Attr::Int("axis", 1)]);
    hiddens[0] = flat;
    for (prefix, relu) in &layers {
        let last = hiddens.last().cloned().unwrap_or_default();
        let z = g.dense(&last, &format!("{prefix}.dense"), false)?;
        let z = g.bn(&z, &format!("{prefix}.bn"), *relu)?;
        hiddens.push(z);
    }
    // final_avg_pool and the hidden layers under their names (hiddens[0..n], at least the
    // pool), then the last entry as proj_head_output.
    let named = config.num_head_layers().max(1);
    let mut outputs: Vec<(String, String)> = names[..named]
        .iter()
        .zip(&hiddens[..named])
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let last = hiddens.last().cloned().unwrap_or_default();
    outputs.push(("proj_head_output".into(), last));
    if config.num_classes.is_some() {
        let input = hiddens[config.supervised_input_index()].clone();
        let logits = g.dense(&input, "head_supervised", true)?;
        outputs.push(("logits_sup".into(), logits));
    }
    // Outputs carry their public names through an Identity each.
    for (name, t) in &outputs {
        g.node_outputs("Identity", &[t], std::slice::from_ref(name), vec![]);
    }

    let weights: usize = g.initializers.iter().map(|t| t.0.len()).sum();
    if weights > PROTOBUF_LIMIT {
        return Err(InteropError::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "the weights take {:.1} GiB, over the 2 GiB an ONNX file can hold in one message (external data is not written)",
                weights as f64 / (1u64 << 30) as f64
            ),
        });
    }
    let mut graph = Pb::default();
    for n in g.nodes.drain(..) {
        graph.msg(1, n);
    }
    graph.str(2, &config.name());
    for t in g.initializers.drain(..) {
        graph.msg(5, t);
    }
    graph.msg(
        11,
        value_info(
            "images",
            &[
                Err("batch"),
                Ok(config.in_channels),
                Err("height"),
                Err("width"),
            ],
        ),
    );
    for (i, (name, _)) in outputs.iter().enumerate() {
        let width = match name.as_str() {
            "logits_sup" => config.num_classes.unwrap_or(0),
            "proj_head_output" => config.hidden_dim(config.num_hiddens() - 1),
            _ => config.hidden_dim(i),
        };
        graph.msg(12, value_info(name, &[Err("batch"), Ok(width)]));
    }
    let mut model = Pb::default();
    model.int(1, IR_VERSION);
    model.str(2, "simclr-rs");
    model.str(3, env!("CARGO_PKG_VERSION"));
    model.msg(7, graph);
    let mut opset = Pb::default();
    opset.str(1, "");
    opset.int(2, OPSET);
    model.msg(8, opset);
    simclr_fs::write_atomic(path, &model.0).map_err(|source| InteropError::Io {
        path: path.to_path_buf(),
        source,
    })
}
