//! Per-request sampling: greedy, temperature, top-k, top-p, seeded.

use tch::{Kind, Tensor};

use crate::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// 1.0 disables nucleus filtering.
    pub top_p: f64,
    /// 0 disables top-k filtering.
    pub top_k: i64,
    pub seed: Option<u64>,
    /// Generation stops after any of these (EOS included by the caller).
    pub stop_token_ids: Vec<u32>,
    /// Also return the ids of the `top_logprobs` most likely tokens at each step (0: none).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop_token_ids: Vec::new(),
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    pub fn is_stop(&self, token: u32) -> bool {
        self.stop_token_ids.contains(&token)
    }
}

/// Picks the next token of each row of `[batch, vocab]` logits.
pub struct Sampler {
    params: SamplingParams,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        if let Some(seed) = params.seed {
            tch::manual_seed(seed as i64);
        }
        Self {
            params: params.clone(),
        }
    }

    pub fn sample(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        let logits = logits.f_to_kind(Kind::Float)?;
        let tokens = if self.params.temperature <= 0.0 {
            logits.f_argmax(-1, false)?
        } else {
            let mut scaled = logits / self.params.temperature;
            let vocab = scaled.size()[1];
            if self.params.top_k > 0 && self.params.top_k < vocab {
                let (top, _) = scaled.f_topk(self.params.top_k, -1, true, true)?;
                let threshold = top.narrow(1, self.params.top_k - 1, 1);
                scaled = scaled.masked_fill(&scaled.lt_tensor(&threshold), f64::NEG_INFINITY);
            }
            if self.params.top_p < 1.0 {
                let (sorted, indices) = scaled.f_sort(-1, true)?;
                let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
                // Drop a token once the mass before it already reaches top_p (the first always stays).
                let before = &cumulative - sorted.softmax(-1, Kind::Float);
                let drop_sorted = before.ge(self.params.top_p);
                let drop = drop_sorted.scatter(-1, &indices, &drop_sorted);
                scaled = scaled.masked_fill(&drop, f64::NEG_INFINITY);
            }
            scaled
                .softmax(-1, Kind::Float)
                .f_multinomial(1, false)?
                .squeeze_dim(-1)
        };
        let tokens = Vec::<i64>::try_from(tokens.to_device(tch::Device::Cpu))?;
        Ok(tokens.into_iter().map(|t| t as u32).collect())
    }
}
