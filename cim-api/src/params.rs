//! [`ParamStore`]: a `VarBuilder` backend with deterministic, device-independent initialisation.
//!
//! candle's CPU RNG cannot be seeded, and a `VarMap` initialises on the device's RNG, so two runs
//! (or a CPU and a CUDA run) would start from different weights. `ParamStore` draws every new
//! parameter on the host from a ChaCha stream seeded by `(seed, parameter name)`: the value of
//! `blocks.3.attn.qkv.weight` depends on nothing else, whatever the build order or device.
//!
//! A store is either trainable (hands out `Var`s that track gradients; the runner's optimizer
//! owns them) or frozen (hands out detached tensors: no autograd graph is built through them).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use crate::{Error, Result};

#[derive(Clone)]
pub struct ParamStore {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    seed: u64,
    trainable: bool,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("seed", &self.seed)
            .field("trainable", &self.trainable)
            .field("len", &self.len())
            .finish()
    }
}

impl ParamStore {
    /// A store whose parameters receive gradients.
    pub fn trainable(seed: u64) -> Self {
        Self {
            vars: Default::default(),
            seed,
            trainable: true,
        }
    }
    /// A store for frozen components: same initialisation, tensors detached from autograd.
    pub fn frozen(seed: u64) -> Self {
        Self {
            trainable: false,
            ..Self::trainable(seed)
        }
    }
    pub fn is_trainable(&self) -> bool {
        self.trainable
    }
    /// A `VarBuilder` over this store; parameters are created on first request.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }
    pub fn len(&self) -> usize {
        self.vars.lock().expect("param store poisoned").len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// All parameters, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let map = self.vars.lock().expect("param store poisoned");
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
    /// Names under `prefix.` (or all when `prefix` is empty).
    pub fn names_under(&self, prefix: &str) -> Vec<String> {
        let map = self.vars.lock().expect("param store poisoned");
        map.keys()
            .filter(|k| prefix.is_empty() || k.starts_with(&format!("{prefix}.")))
            .cloned()
            .collect()
    }
    pub fn get(&self, name: &str) -> Option<Var> {
        self.vars
            .lock()
            .expect("param store poisoned")
            .get(name)
            .cloned()
    }
    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }
    /// Overwrites existing parameters with `tensors` (shape-checked, naming the key); keys that
    /// name no parameter are an error, and so are parameters missing from `tensors` when `strict`.
    pub fn load(&self, tensors: &BTreeMap<String, Tensor>, strict: bool) -> Result<()> {
        let map = self.vars.lock().expect("param store poisoned");
        for (name, t) in tensors {
            let var = map.get(name).ok_or_else(|| {
                Error::msg(format!(
                    "checkpoint key `{name}` names no parameter of the model"
                ))
            })?;
            if var.shape() != t.shape() {
                return Err(Error::msg(format!(
                    "checkpoint key `{name}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            check_float(name, t.dtype())?;
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        if strict {
            if let Some(missing) = map.keys().find(|k| !tensors.contains_key(*k)) {
                return Err(Error::msg(format!(
                    "checkpoint has no tensor for parameter `{missing}`"
                )));
            }
        }
        Ok(())
    }
}

/// 64-bit FNV-1a, fed piece by piece: a hash that is the same across builds, platforms and
/// processes (parameter names' seeds, sweep cells' names, the ranks' weight checksums).
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(pub u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// [`Fnv1a`] of one string.
pub fn fnv1a(s: &str) -> u64 {
    let mut h = Fnv1a::default();
    h.update(s.as_bytes());
    h.0
}

/// Draws a tensor for `init` on the host from a stream seeded by `(seed, name)`.
pub fn init_tensor(
    shape: &Shape,
    init: Init,
    seed: u64,
    name: &str,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.elem_count();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ fnv1a(name).rotate_left(17));
    let mut normal = |mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z: f64 = rng.sample(StandardNormal);
                (mean + std * z) as f32
            })
            .collect()
    };
    let data: Vec<f32> = match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => normal(mean, stdev),
        Init::Uniform { lo, up } => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ fnv1a(name));
            (0..n).map(|_| rng.gen_range(lo..up) as f32).collect()
        }
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn | FanInOut::FanOut => fan.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => normal(0.0, std),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ fnv1a(name));
                    (0..n)
                        .map(|_| rng.gen_range(-bound..bound) as f32)
                        .collect()
                }
            }
        }
    };
    Ok(Tensor::from_vec(data, shape.clone(), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

impl SimpleBackend for ParamStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut map = self.vars.lock().expect("param store poisoned");
        let var = match map.get(name) {
            Some(v) => {
                if v.shape() != &s {
                    candle_core::bail!(
                        "parameter `{name}` requested with shape {s:?}, it exists with shape {:?}",
                        v.shape()
                    );
                }
                v.clone()
            }
            None => {
                let t = init_tensor(&s, h, self.seed, name, dtype, dev)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let v = Var::from_tensor(&t)?;
                map.insert(name.to_string(), v.clone());
                v
            }
        };
        let t = if self.trainable {
            var.as_tensor().clone()
        } else {
            var.as_detached_tensor()
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let map = self.vars.lock().expect("param store poisoned");
        match map.get(name) {
            Some(v) if self.trainable => v.as_tensor().to_dtype(dtype),
            Some(v) => v.as_detached_tensor().to_dtype(dtype),
            None => candle_core::bail!(
                "parameter `{name}` does not exist and has no shape to create it with"
            ),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars
            .lock()
            .expect("param store poisoned")
            .contains_key(name)
    }
}

/// Parameters load from floating-point tensors only: integer values of the right shape (a u8
/// image, an index table under a parameter's name) would be converted without a word.
pub fn check_float(name: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(()),
        other => Err(Error::msg(format!(
            "tensor `{name}` holds {other:?} values; parameters load from f32, f16, bf16 or f64 tensors"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_depends_only_on_seed_and_name() -> Result<()> {
        let dev = Device::Cpu;
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let a = ParamStore::trainable(7);
        let b = ParamStore::trainable(7);
        let va = a.var_builder(DType::F32, &dev);
        let vb = b.var_builder(DType::F32, &dev);
        // Different creation order, same values.
        let a1 = va.get_with_hints((4, 5), "x.weight", init)?;
        let _ = va.get_with_hints(3, "y", init)?;
        let _ = vb.get_with_hints(3, "y", init)?;
        let b1 = vb.get_with_hints((4, 5), "x.weight", init)?;
        assert_eq!(a1.to_vec2::<f32>()?, b1.to_vec2::<f32>()?);
        // Another seed or name gives other values; the std is what was asked for.
        let c = ParamStore::trainable(8).var_builder(DType::F32, &dev);
        let c1 = c.get_with_hints((4, 5), "x.weight", init)?;
        assert_ne!(a1.to_vec2::<f32>()?, c1.to_vec2::<f32>()?);
        let big = va.get_with_hints(20000, "big", init)?;
        let std = big.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt();
        assert!((std - 0.02).abs() < 0.001, "std {std}");
        assert_eq!(a.len(), 3);
        Ok(())
    }

    #[test]
    fn frozen_store_tensors_are_detached_and_trainable_are_vars() -> Result<()> {
        let dev = Device::Cpu;
        let t = ParamStore::trainable(0).var_builder(DType::F32, &dev);
        let f = ParamStore::frozen(0).var_builder(DType::F32, &dev);
        let tw = t.get_with_hints(3, "w", Init::Const(1.0))?;
        let fw = f.get_with_hints(3, "w", Init::Const(1.0))?;
        assert!(tw.is_variable());
        assert!(!fw.is_variable());
        // Asking again with another shape names the parameter.
        let err = t.get_with_hints(4, "w", Init::Const(1.0)).unwrap_err();
        assert!(err.to_string().contains("`w`"), "{err}");
        Ok(())
    }

    /// A tensor of the right shape but an integer dtype is refused, naming the key and dtype;
    /// float dtypes load (converted to the parameter's).
    #[test]
    fn integer_tensors_do_not_load_into_parameters() {
        let store = ParamStore::trainable(0);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let _ = vb.get_with_hints(4, "w", Init::Const(0.0)).unwrap();
        let u8s = Tensor::new(&[1u8, 2, 3, 4], &Device::Cpu).unwrap();
        let e = store
            .load(&BTreeMap::from([("w".to_string(), u8s)]), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`w`") && e.contains("U8"), "{e}");
        let halves = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        store
            .load(&BTreeMap::from([("w".to_string(), halves)]), true)
            .unwrap();
    }
}
