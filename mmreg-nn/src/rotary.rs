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
    /// Qwen2-VL's M-RoPE: how many of the `head_dim / 2` frequencies follow the temporal, height and
    /// width positions.
    pub mrope_section: Option<Vec<i64>>,
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
            // Qwen2-VL's configs of transformers 4.x name M-RoPE `mrope`; its angles are the default's.
            None | Some("default") | Some("mrope") => Ok(RopeKind::Default),
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
    /// M-RoPE (Qwen2-VL): the frequencies taken from each position row, in order, cycling through the
    /// rows (temporal, height, width); `None` for one row of positions.
    mrope_section: Option<Vec<i64>>,
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
            mrope_section: None,
        }
    }

    /// Multimodal RoPE: positions come in `sections.len()` rows (`[rows, tokens]`), and frequency chunk
    /// `i` (of `sections[i]` frequencies) follows row `i % rows`, as HF's Qwen2-VL recomposes them.
    pub fn with_mrope_section(self, sections: Vec<i64>) -> Self {
        Self {
            mrope_section: Some(sections),
            ..self
        }
    }

    /// How many rows of positions [`Self::at`] takes.
    pub fn position_rows(&self) -> usize {
        self.mrope_section.as_ref().map_or(1, |_| 3)
    }

    /// `cos` and `sin` for `positions` (`[tokens]`, or `[3, tokens]` with M-RoPE; int64), in `kind`.
    pub fn at(&self, positions: &Tensor, kind: Kind) -> RotaryAt {
        let freqs = match (&self.mrope_section, positions.dim()) {
            (Some(sections), 2) => {
                // [rows, tokens, d/2], then each chunk of frequencies from its row.
                let all =
                    positions.to_kind(Kind::Float).unsqueeze(2) * self.inv_freq.view([1, 1, -1]);
                let rows = all.size()[0];
                let chunks: Vec<Tensor> = all
                    .split_with_sizes(sections.as_slice(), 2)
                    .iter()
                    .enumerate()
                    .map(|(i, chunk)| chunk.get(i as i64 % rows))
                    .collect();
                Tensor::cat(&chunks, 1)
            }
            _ => positions.to_kind(Kind::Float).unsqueeze(1) * self.inv_freq.unsqueeze(0),
        };
        let emb = Tensor::cat(&[&freqs, &freqs], 1);
        RotaryAt {
            cos: emb.cos().to_kind(kind),
            sin: emb.sin().to_kind(kind),
        }
    }
}
