//! Per-request sampling: greedy, temperature, top-k, top-p, with a seeded generator per request, so a
//! request samples the same tokens alone or batched with others.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use mmreg_core::Result;

use crate::engine::TokenLogprobs;

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
    /// Generation stops when the text ends with any of these (which are cut from the text).
    pub stop: Vec<String>,
    /// Also return the ids of the `top_logprobs` most likely tokens at each step (0: none), and with
    /// their log-probabilities in [`Completion::logprobs`](crate::Completion::logprobs).
    pub top_logprobs: usize,
    /// Return the log-probability of each generated token ([`Completion::logprobs`](crate::Completion::logprobs)).
    pub logprobs: bool,
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
            stop: Vec::new(),
            top_logprobs: 0,
            logprobs: false,
        }
    }
}

impl SamplingParams {
    pub fn is_stop(&self, token: u32) -> bool {
        self.stop_token_ids.contains(&token)
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether log-probabilities are asked for.
    pub fn wants_logprobs(&self) -> bool {
        self.logprobs || self.top_logprobs > 0
    }
}

/// The log-probability of `token` and the `k` most likely tokens in a `[vocab]` (or `[1, vocab]`) logits
/// row, under the model's raw distribution.
pub fn token_logprobs(logits: &Tensor, token: u32, k: usize) -> Result<TokenLogprobs> {
    let logprobs = logits
        .f_to_kind(Kind::Float)?
        .flatten(0, -1)
        .f_log_softmax(0, Kind::Float)?;
    let logprob = logprobs.f_double_value(&[i64::from(token)])? as f32;
    let top = if k == 0 {
        Vec::new()
    } else {
        let (values, ids) = logprobs.f_topk(k as i64, 0, true, true)?;
        let values = Vec::<f32>::try_from(values.to_device(Device::Cpu))?;
        let ids = Vec::<i64>::try_from(ids.to_device(Device::Cpu))?;
        ids.into_iter().map(|t| t as u32).zip(values).collect()
    };
    Ok(TokenLogprobs {
        token,
        logprob,
        top,
    })
}

/// Picks a request's next token from its logits row.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params: params.clone(),
            rng,
        }
    }

    /// The next token from `[vocab]` (or `[1, vocab]`) logits.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits = logits.f_to_kind(Kind::Float)?.flatten(0, -1);
        if self.params.is_greedy() {
            return Ok(logits.f_argmax(0, false)?.int64_value(&[]) as u32);
        }
        let mut scaled = logits / self.params.temperature;
        let vocab = scaled.size()[0];
        if self.params.top_k > 0 && self.params.top_k < vocab {
            let (top, _) = scaled.f_topk(self.params.top_k, 0, true, true)?;
            let threshold = top.get(self.params.top_k - 1);
            scaled = scaled.masked_fill(&scaled.lt_tensor(&threshold), f64::NEG_INFINITY);
        }
        if self.params.top_p < 1.0 {
            let (sorted, indices) = scaled.f_sort(0, true)?;
            let probs = sorted.softmax(0, Kind::Float);
            // Drop a token once the mass before it reaches top_p (the most likely one always stays).
            let drop_sorted = (probs.cumsum(0, Kind::Float) - &probs).ge(self.params.top_p);
            let drop = drop_sorted.scatter(0, &indices, &drop_sorted);
            scaled = scaled.masked_fill(&drop, f64::NEG_INFINITY);
        }
        let probs = Vec::<f32>::try_from(scaled.softmax(0, Kind::Float).to_device(Device::Cpu))?;
        let mut target: f32 = self.rng.random::<f32>() * probs.iter().sum::<f32>();
        let mut last_possible = 0;
        for (token, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                last_possible = token;
                if target < p {
                    return Ok(token as u32);
                }
                target -= p;
            }
        }
        Ok(last_possible as u32)
    }
}
