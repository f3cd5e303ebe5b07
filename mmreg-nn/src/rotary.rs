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
    /// `cos` and `sin` at every position below a bound, made once (see [`Self::with_table`]).
    table: Option<(Kind, RotaryAt)>,
}

/// The most bytes [`RotaryEmbedding::with_table`] spends on its table (a 7B decoder's head of 128 at
/// 32768 positions in bf16).
const TABLE_BYTES: usize = 16 << 20;

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
            table: None,
        }
    }

    /// The same embedding, with `cos` and `sin` in `kind` made once for positions `0..positions` (the
    /// longest sequence the model runs), so that [`Self::at`] looks a step's positions up (two index
    /// kernels) instead of computing them (seven: a decode step's share of its time at batch 1). The
    /// table holds what `at` computes, position by position (the same elementwise ops). Not for M-RoPE,
    /// nor where the table would pass `TABLE_BYTES`.
    pub fn with_table(self, positions: usize, kind: Kind) -> Self {
        let dim = 2 * self.inv_freq.size()[0] as usize;
        let bytes = 2 * positions * dim * kind.elt_size_in_bytes();
        if self.mrope_section.is_some() || positions == 0 || bytes > TABLE_BYTES {
            return self;
        }
        let all = Tensor::arange(positions as i64, (Kind::Int64, self.inv_freq.device()));
        let table = self.compute(&all, kind);
        Self {
            table: Some((kind, table)),
            ..self
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
        if let Some((table_kind, table)) = &self.table {
            if *table_kind == kind && positions.dim() == 1 {
                // (A position past the table is an error on the CPU, computed instead; the engine keeps
                // positions below the model's longest sequence.)
                let look_up = |t: &Tensor| t.f_index_select(0, positions);
                if let (Ok(cos), Ok(sin)) = (look_up(&table.cos), look_up(&table.sin)) {
                    return RotaryAt { cos, sin };
                }
            }
        }
        self.compute(positions, kind)
    }

    fn compute(&self, positions: &Tensor, kind: Kind) -> RotaryAt {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
    }

    #[test]
    fn the_table_holds_what_at_computes() {
        let plain =
            RotaryEmbedding::new(128, 10000.0, RopeKind::Linear { factor: 2.0 }, Device::Cpu);
        let with =
            RotaryEmbedding::new(128, 10000.0, RopeKind::Linear { factor: 2.0 }, Device::Cpu)
                .with_table(4096, Kind::BFloat16);
        assert!(with.table.is_some());
        let positions = Tensor::from_slice(&[0i64, 1, 17, 603, 4095, 2048]);
        for kind in [Kind::BFloat16, Kind::Float] {
            let (a, b) = (plain.at(&positions, kind), with.at(&positions, kind));
            assert_eq!(b.cos.size(), [6, 128]);
            assert_eq!(b.cos.kind(), kind);
            // Bit for bit, in the table's dtype and (computed) in another.
            assert_eq!(values(&a.cos), values(&b.cos));
            assert_eq!(values(&a.sin), values(&b.sin));
        }
        // A position past the table: computed.
        let past = Tensor::from_slice(&[4096i64, 5]);
        let (a, b) = (
            plain.at(&past, Kind::BFloat16),
            with.at(&past, Kind::BFloat16),
        );
        assert_eq!(values(&a.cos), values(&b.cos));
        assert_eq!(values(&a.sin), values(&b.sin));
    }

    #[test]
    fn no_table_for_m_rope_or_past_its_bytes() {
        let mrope = RotaryEmbedding::new(128, 1e6, RopeKind::Default, Device::Cpu)
            .with_mrope_section(vec![16, 24, 24])
            .with_table(4096, Kind::BFloat16);
        assert!(mrope.table.is_none());
        let long = RotaryEmbedding::new(256, 1e6, RopeKind::Default, Device::Cpu)
            .with_table(131072, Kind::BFloat16);
        assert!(long.table.is_none());
    }
}
