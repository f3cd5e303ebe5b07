//! Rotary position embeddings (RoPE) as HF's Llama computes them: `inv_freq = 1 / theta^(2i/d)` in f32 on
//! the CPU, `cos` and `sin` of `position × inv_freq` (the two halves repeated), rounded to the model dtype
//! before they multiply the queries and keys.

use mmreg_core::{Error, Result};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

/// `rope_scaling` / `rope_parameters` of a config.json, as far as the numbers go.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RopeScaling {
    /// `rope_type` (transformers ≥ 4.45, and 5.x's `rope_parameters`) or the older `type`.
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    /// transformers 5 keeps `rope_theta` here.
    pub rope_theta: Option<f64>,
}

/// How positions map to angles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeKind {
    /// HF's `default`.
    Default,
    /// HF's `linear`: positions divided by `factor` (the same as `inv_freq / factor`).
    Linear { factor: f64 },
}

impl RopeKind {
    /// The kind a config asks for; any other `rope_type` is refused with an error naming it, rather than
    /// silently computing other numbers.
    pub fn from_config(scaling: Option<&RopeScaling>) -> Result<Self> {
        let Some(scaling) = scaling else {
            return Ok(RopeKind::Default);
        };
        match scaling.rope_type.as_deref() {
            None | Some("default") => Ok(RopeKind::Default),
            Some("linear") => match scaling.factor {
                Some(factor) if factor > 0.0 => Ok(RopeKind::Linear { factor }),
                other => Err(Error::config(
                    "config.json",
                    format!("rope_scaling: `linear` needs a positive `factor`, got {other:?}"),
                )),
            },
            Some(other) => Err(Error::config(
                "config.json",
                format!("rope_scaling: rope_type `{other}` is not supported (default, linear)"),
            )),
        }
    }
}

/// The frequencies of one model's rotary embedding.
pub struct RotaryEmbedding {
    /// `1 / theta^(2i/d)` (divided by the linear factor), f32 on the model's device.
    inv_freq: Tensor,
}

/// `cos` and `sin` at one step's positions, `[tokens, head_dim]` in the model dtype.
pub struct RotaryAt {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RotaryEmbedding {
    pub fn new(head_dim: i64, theta: f64, kind: RopeKind, device: Device) -> Self {
        let exponent = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / head_dim as f64;
        let mut inv_freq = Tensor::scalar_tensor(theta, (Kind::Float, Device::Cpu))
            .pow(&exponent)
            .reciprocal();
        if let RopeKind::Linear { factor } = kind {
            inv_freq /= factor;
        }
        Self {
            inv_freq: inv_freq.to_device(device),
        }
    }

    /// `cos` and `sin` for `positions` (`[tokens]`, int64), in `kind`.
    pub fn at(&self, positions: &Tensor, kind: Kind) -> RotaryAt {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(1) * self.inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], 1);
        RotaryAt {
            cos: emb.cos().to_kind(kind),
            sin: emb.sin().to_kind(kind),
        }
    }
}
