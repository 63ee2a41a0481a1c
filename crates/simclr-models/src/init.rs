//! Variable initialisation: the official initialisers as `VarBuilder` back ends.
//!
//! Layers ask their `VarBuilder` for variables with a candle [`Init`] hint. Two of the hints
//! carry the official meaning here:
//!
//! * [`conv_init`] (`Init::Kaiming { Normal, FanIn, Linear }`) stands for TF's
//!   `VarianceScaling(scale=1.0, mode="fan_in", distribution="truncated_normal")`: a normal
//!   truncated at two standard deviations, rescaled so that the *truncated* distribution has
//!   standard deviation `sqrt(1 / fan_in)`.
//! * [`dense_init`] (`Init::Randn { 0, 0.01 }`) is `RandomNormal(stddev=0.01)`.
//!
//! [`SeededInit`] honours these exactly from a seeded ChaCha stream, so a given seed always
//! yields the same model. A plain `VarBuilder::from_varmap` also works but draws the
//! conv weights from an untruncated normal of the same standard deviation and is not seeded.
//!
//! [`ShapeRecorder`] builds nothing: it records the name and shape of every variable the
//! model asks for and hands back zero-strided views of one scalar, so the layout of a
//! 795M-parameter model can be listed without allocating it.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Standard deviation of a unit normal truncated to [-2, 2] (TF's correction constant).
pub const TRUNCATED_NORMAL_STD: f64 = 0.879_625_661_034_239_8;

/// The conv-kernel initialiser: VarianceScaling(1.0, fan_in, truncated normal).
pub fn conv_init() -> Init {
    Init::Kaiming {
        dist: candle_nn::init::NormalOrUniform::Normal,
        fan: candle_nn::init::FanInOut::FanIn,
        non_linearity: candle_nn::init::NonLinearity::Linear,
    }
}

/// The dense-kernel initialiser of both heads: N(0, 0.01).
pub fn dense_init() -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: 0.01,
    }
}

fn lock_err<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("variable store lock poisoned".into())
}

/// Draws `n` samples of a normal truncated at +-2 standard deviations (rejection sampling, as
/// TF does), scaled so that the untruncated standard deviation is `std / TRUNCATED_NORMAL_STD`.
pub fn truncated_normal<R: Rng>(rng: &mut R, n: usize, std: f64) -> Vec<f32> {
    let scale = std / TRUNCATED_NORMAL_STD;
    (0..n)
        .map(|_| loop {
            let z: f64 = rng.sample(StandardNormal);
            if z.abs() <= 2.0 {
                break (z * scale) as f32;
            }
        })
        .collect()
}

fn sample<R: Rng>(rng: &mut R, shape: &Shape, init: Init) -> Vec<f32> {
    let n = shape.elem_count();
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| {
                let z: f64 = rng.sample(StandardNormal);
                (mean + stdev * z) as f32
            })
            .collect(),
        Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = fan.for_shape(shape).max(1);
            let std = non_linearity.gain() / (fan as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Normal => truncated_normal(rng, n, std),
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..n)
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect()
                }
            }
        }
    }
}

/// A `VarBuilder` back end that creates every missing variable in a [`VarMap`] from a seeded
/// random stream, with the official initialisers (see the module docs). Variables already in
/// the map are returned as they are (after a shape check).
pub struct SeededInit {
    varmap: VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl SeededInit {
    /// A back end that adds the variables it creates to `varmap`.
    pub fn new(varmap: VarMap, seed: u64) -> Self {
        Self {
            varmap,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    /// A `VarBuilder` over a [`SeededInit`] back end.
    pub fn var_builder(
        varmap: &VarMap,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(Self::new(varmap.clone(), seed)),
            dtype,
            device.clone(),
        )
    }
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().map_err(lock_err)?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "shape mismatch on {name}: asked for {s:?}, the store has {:?}",
                    var.shape()
                )
            }
            return Ok(var.as_tensor().clone());
        }
        let values = {
            let mut rng = self.rng.lock().map_err(lock_err)?;
            sample(&mut *rng, &s, h)
        };
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.varmap.data().lock().map_err(lock_err)?;
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("`SeededInit` needs a shape to create {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// A `VarBuilder` back end that records `(name, shape)` of each variable asked for and returns
/// a zero-strided view of a single zero (no allocation proportional to the shape).
#[derive(Clone, Default)]
pub struct ShapeRecorder {
    seen: Arc<Mutex<Vec<NamedShape>>>,
}

/// A variable name and its shape.
pub type NamedShape = (String, Vec<usize>);

impl ShapeRecorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A `VarBuilder` that records into this recorder.
    pub fn var_builder(&self, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, Device::Cpu)
    }

    /// The variables asked for so far, in creation order.
    pub fn shapes(&self) -> Vec<NamedShape> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl SimpleBackend for ShapeRecorder {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.seen
            .lock()
            .map_err(lock_err)?
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("`ShapeRecorder` needs a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}
