//! The Gemma decoders (`GemmaModel` for PaliGemma, `Gemma3TextModel` for Gemma 3): token embeddings
//! scaled by `√hidden`, RMSNorm with a `1 + weight` gain computed in f32, GeGLU MLP, half-split rotary
//! embeddings. Gemma 3 adds a norm on queries and keys, norms after attention and the MLP, the
//! `query_pre_attn_scalar` softmax scale, and layers that attend within a sliding window, with their own
//! rotary base.

use mmreg_core::{Error, KvCacheSpec, LanguageModel, Result, Step};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::llama::Mlp;
use crate::rotary::{RopeKind, RopeScaling, RotaryAt, RotaryEmbedding};
use crate::{Attention, Embedding, Linear, Loader};

/// `text_config` of a Gemma decoder as config.json writes it; defaults depend on `model_type`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GemmaConfigJson {
    pub model_type: Option<String>,
    pub vocab_size: Option<i64>,
    pub hidden_size: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<i64>,
    pub num_key_value_heads: Option<i64>,
    pub head_dim: Option<i64>,
    pub hidden_act: Option<String>,
    pub hidden_activation: Option<String>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    /// transformers 5: one set of parameters, or one per layer type (`full_attention`,
    /// `sliding_attention`).
    pub rope_parameters: Option<serde_json::Value>,
    pub rope_scaling: Option<RopeScaling>,
    /// Gemma 3: the rotary base of the sliding-window layers (transformers 4.x).
    pub rope_local_base_freq: Option<f64>,
    pub query_pre_attn_scalar: Option<f64>,
    pub sliding_window: Option<usize>,
    /// `sliding_attention` or `full_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    /// Older Gemma 3 configs: every `sliding_window_pattern`-th layer is global.
    pub sliding_window_pattern: Option<usize>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub attention_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<u32>,
}

/// Which Gemma generation a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmaVersion {
    /// Gemma (PaliGemma's decoder).
    Gemma,
    /// Gemma 3: QK-norm, sandwich norms, interleaved sliding-window layers.
    Gemma3,
}

/// The resolved decoder configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaConfig {
    pub version: GemmaVersion,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// Softmax scale of attention.
    pub attn_scale: f64,
    /// Rotary base and scaling of the global layers.
    pub rope: (f64, RopeKind),
    /// … and of the sliding-window layers.
    pub local_rope: (f64, RopeKind),
    /// Per layer: `Some(window)` for a sliding-window layer.
    pub windows: Vec<Option<usize>>,
    pub final_logit_softcapping: Option<f64>,
    pub tie_word_embeddings: bool,
}

/// `rope_type`, `factor` and `rope_theta` of one entry of `rope_parameters`.
fn rope_entry(value: &serde_json::Value) -> Result<(Option<f64>, RopeKind)> {
    let scaling: RopeScaling = serde_json::from_value(value.clone())
        .map_err(|e| Error::config("config.json", format!("rope_parameters: {e}")))?;
    Ok((scaling.rope_theta, RopeKind::from_config(Some(&scaling))?))
}

impl GemmaConfigJson {
    /// Fills missing keys with `GemmaConfig`'s or `Gemma3TextConfig`'s defaults, and refuses keys this
    /// decoder does not compute.
    pub fn resolve(&self) -> Result<GemmaConfig> {
        let version = match self.model_type.as_deref() {
            None | Some("gemma") => GemmaVersion::Gemma,
            Some("gemma3_text") => GemmaVersion::Gemma3,
            Some(other) => {
                return Err(Error::config(
                    "config.json",
                    format!(
                        "text_config.model_type `{other}` is not supported (gemma, gemma3_text)"
                    ),
                ))
            }
        };
        let gemma3 = version == GemmaVersion::Gemma3;
        let refused: Vec<&str> = [
            (self.attention_bias == Some(true), "attention_bias: true"),
            (
                self.attn_logit_softcapping.is_some(),
                "attn_logit_softcapping",
            ),
        ]
        .into_iter()
        .filter_map(|(set, key)| set.then_some(key))
        .collect();
        if !refused.is_empty() {
            return Err(Error::config(
                "config.json",
                format!(
                    "text_config: {} not supported by the Gemma decoder",
                    refused.join(", ")
                ),
            ));
        }
        let hidden_size = self.hidden_size.unwrap_or(if gemma3 { 2304 } else { 3072 });
        let num_attention_heads = self
            .num_attention_heads
            .unwrap_or(if gemma3 { 8 } else { 16 });
        let head_dim = self.head_dim.unwrap_or(256);
        let num_hidden_layers = self
            .num_hidden_layers
            .unwrap_or(if gemma3 { 26 } else { 28 });
        let windows = self.windows(gemma3, num_hidden_layers)?;
        let (rope, local_rope) = self.ropes(gemma3)?;
        let config = GemmaConfig {
            version,
            vocab_size: self
                .vocab_size
                .unwrap_or(if gemma3 { 262208 } else { 256000 }),
            hidden_size,
            intermediate_size: self
                .intermediate_size
                .unwrap_or(if gemma3 { 9216 } else { 24576 }),
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(if gemma3 {
                4
            } else {
                num_attention_heads
            }),
            head_dim,
            hidden_act: if gemma3 {
                self.hidden_activation.as_ref().or(self.hidden_act.as_ref())
            } else {
                self.hidden_act.as_ref().or(self.hidden_activation.as_ref())
            }
            .cloned()
            .unwrap_or_else(|| "gelu_pytorch_tanh".into()),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(if gemma3 {
                131072
            } else {
                8192
            }),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            attn_scale: if gemma3 {
                self.query_pre_attn_scalar.unwrap_or(256.0).powf(-0.5)
            } else {
                (head_dim as f64).powf(-0.5)
            },
            rope,
            local_rope,
            windows,
            final_logit_softcapping: self.final_logit_softcapping,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(true),
        };
        let heads_ok = config.num_attention_heads > 0
            && config.num_key_value_heads > 0
            && config.num_attention_heads % config.num_key_value_heads == 0;
        if !heads_ok || config.head_dim <= 0 || config.head_dim % 2 != 0 {
            return Err(Error::config(
                "config.json",
                format!(
                    "text_config: {} attention heads, {} key/value heads and head_dim {} do not fit together",
                    config.num_attention_heads, config.num_key_value_heads, config.head_dim
                ),
            ));
        }
        Ok(config)
    }

    /// The sliding window of each layer: from `layer_types`, or every `sliding_window_pattern`-th layer
    /// global (Gemma 3's default 6); Gemma has none.
    fn windows(&self, gemma3: bool, layers: usize) -> Result<Vec<Option<usize>>> {
        if !gemma3 {
            return Ok(vec![None; layers]);
        }
        let window = self.sliding_window.unwrap_or(4096);
        let types: Vec<String> = match &self.layer_types {
            Some(types) => types.clone(),
            None => {
                let pattern = self.sliding_window_pattern.unwrap_or(6).max(1);
                (0..layers)
                    .map(|i| {
                        if (i + 1) % pattern == 0 {
                            "full_attention".into()
                        } else {
                            "sliding_attention".into()
                        }
                    })
                    .collect()
            }
        };
        if types.len() != layers {
            return Err(Error::config(
                "config.json",
                format!(
                    "layer_types has {} entries for {layers} layers",
                    types.len()
                ),
            ));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(Some(window)),
                "full_attention" => Ok(None),
                other => Err(Error::config(
                    "config.json",
                    format!("layer_types: `{other}` is not supported (sliding_attention, full_attention)"),
                )),
            })
            .collect()
    }

    /// `(theta, scaling)` of the global and the sliding-window layers.
    fn ropes(&self, gemma3: bool) -> Result<((f64, RopeKind), (f64, RopeKind))> {
        let default_theta = if gemma3 { 1_000_000.0 } else { 10000.0 };
        let local_default = self.rope_local_base_freq.unwrap_or(10000.0);
        let params = self.rope_parameters.as_ref();
        // transformers 5 writes one entry per layer type for Gemma 3.
        if let Some(full) = params.and_then(|p| p.get("full_attention")) {
            let (theta, kind) = rope_entry(full)?;
            let (local_theta, local_kind) = match params.and_then(|p| p.get("sliding_attention")) {
                Some(local) => rope_entry(local)?,
                None => (None, RopeKind::Default),
            };
            return Ok((
                (theta.or(self.rope_theta).unwrap_or(default_theta), kind),
                (local_theta.unwrap_or(local_default), local_kind),
            ));
        }
        let (theta, kind) = match params {
            Some(p) => rope_entry(p)?,
            None => (None, RopeKind::from_config(self.rope_scaling.as_ref())?),
        };
        let global = (theta.or(self.rope_theta).unwrap_or(default_theta), kind);
        let local = if gemma3 {
            (local_default, RopeKind::Default)
        } else {
            global
        };
        Ok((global, local))
    }
}

/// Gemma's RMSNorm: normalised in f32, times `1 + weight` in f32, then cast back (Llama casts before the
/// weight).
pub struct GemmaRmsNorm {
    /// `1 + weight`, f32.
    gain: Tensor,
    eps: f64,
}

impl GemmaRmsNorm {
    pub fn load(loader: &Loader, size: i64, eps: f64) -> Result<Self> {
        let weight = loader.get_kind("weight", &[size], Kind::Float)?;
        Ok(Self {
            gain: weight + 1.0,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let variance = xf.square().mean_dim(-1, true, Kind::Float);
        ((xf * (variance + self.eps).rsqrt()) * &self.gain).to_kind(x.kind())
    }
}

/// `self_attn`: stacked q/k/v, Gemma 3's per-head norms on queries and keys, rotary embeddings, attention
/// over the KV cache, `o_proj`.
struct GemmaAttention {
    qkv_proj: Linear,
    q_norm: Option<GemmaRmsNorm>,
    k_norm: Option<GemmaRmsNorm>,
    o_proj: Linear,
    attn: Attention,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl GemmaAttention {
    fn load(loader: &Loader, layer: usize, c: &GemmaConfig) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let qk_norm = |name: &str| -> Result<Option<GemmaRmsNorm>> {
            match c.version {
                GemmaVersion::Gemma3 => Ok(Some(GemmaRmsNorm::load(
                    &loader.pp(name),
                    d,
                    c.rms_norm_eps,
                )?)),
                GemmaVersion::Gemma => Ok(None),
            }
        };
        let mut attn = Attention::new(layer, c.num_attention_heads, c.num_key_value_heads, d)
            .with_scale(c.attn_scale);
        if let Some(window) = c.windows[layer] {
            attn = attn.with_sliding_window(window);
        }
        Ok(Self {
            qkv_proj: Linear::load_stacked(
                &[
                    (&loader.pp("q_proj"), q),
                    (&loader.pp("k_proj"), kv),
                    (&loader.pp("v_proj"), kv),
                ],
                h,
                false,
            )?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            o_proj: Linear::load(&loader.pp("o_proj"), q, h, false)?,
            attn,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: d,
        })
    }

    fn forward(&self, x: &Tensor, rotary: &RotaryAt, step: &mut Step) -> Result<Tensor> {
        let t = x.size()[0];
        let (h, kv) = (self.heads, self.kv_heads);
        let mut qkv = self
            .qkv_proj
            .forward(x)
            .view([t, h + 2 * kv, self.head_dim]);
        if let (Some(q_norm), Some(k_norm)) = (&self.q_norm, &self.k_norm) {
            qkv = Tensor::cat(
                &[
                    q_norm.forward(&qkv.narrow(1, 0, h)),
                    k_norm.forward(&qkv.narrow(1, h, kv)),
                    qkv.narrow(1, h + kv, kv),
                ],
                1,
            );
        }
        let out = self.attn.forward_rotary(&qkv, rotary, step)?;
        Ok(self.o_proj.forward(&out.reshape([t, h * self.head_dim])))
    }
}

struct GemmaDecoderLayer {
    input_layernorm: GemmaRmsNorm,
    self_attn: GemmaAttention,
    /// Gemma: the norm before the MLP. Gemma 3: the norm of the attention output.
    post_attention_layernorm: GemmaRmsNorm,
    /// Gemma 3's norm before the MLP, and of the MLP's output.
    pre_feedforward_layernorm: Option<GemmaRmsNorm>,
    post_feedforward_layernorm: Option<GemmaRmsNorm>,
    /// GeGLU (`gelu_pytorch_tanh`).
    mlp: Mlp,
    sliding: bool,
}

impl GemmaDecoderLayer {
    fn load(loader: &Loader, layer: usize, c: &GemmaConfig) -> Result<Self> {
        let norm = |name: &str| GemmaRmsNorm::load(&loader.pp(name), c.hidden_size, c.rms_norm_eps);
        let gemma3 = c.version == GemmaVersion::Gemma3;
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: GemmaAttention::load(&loader.pp("self_attn"), layer, c)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: gemma3
                .then(|| norm("pre_feedforward_layernorm"))
                .transpose()?,
            post_feedforward_layernorm: gemma3
                .then(|| norm("post_feedforward_layernorm"))
                .transpose()?,
            mlp: Mlp::load_sized(
                &loader.pp("mlp"),
                c.hidden_size,
                c.intermediate_size,
                &c.hidden_act,
            )?,
            sliding: c.windows[layer].is_some(),
        })
    }

    fn forward(&self, hidden: &Tensor, rotary: &RotaryAt, step: &mut Step) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(hidden), rotary, step)?;
        Ok(
            match (
                &self.pre_feedforward_layernorm,
                &self.post_feedforward_layernorm,
            ) {
                (Some(pre), Some(post)) => {
                    let hidden = hidden + self.post_attention_layernorm.forward(&attn);
                    let mlp = self.mlp.forward(&pre.forward(&hidden))?;
                    hidden + post.forward(&mlp)
                }
                _ => {
                    let hidden = hidden + attn;
                    let mlp = self
                        .mlp
                        .forward(&self.post_attention_layernorm.forward(&hidden))?;
                    hidden + mlp
                }
            },
        )
    }
}

/// The Gemma decoder stack with its scaled embeddings and (tied) LM head.
pub struct Gemma {
    embed_tokens: Embedding,
    /// `√hidden`, rounded to f32 then to the model dtype, as HF's scaled embedding.
    embed_scale: Tensor,
    layers: Vec<GemmaDecoderLayer>,
    norm: GemmaRmsNorm,
    lm_head: Linear,
    rotary_emb: RotaryEmbedding,
    rotary_emb_local: RotaryEmbedding,
    /// Added to the step's positions before the rotary embeddings (PaliGemma counts from 1).
    position_offset: i64,
    pub config: GemmaConfig,
    device: Device,
}

impl Gemma {
    /// Loads `embed_tokens`, `layers` and `norm` from `loader`, and `lm_head` from its own loader (or the
    /// token embeddings, with `tie_word_embeddings`).
    pub fn load(loader: &Loader, lm_head: &Loader, config: GemmaConfig) -> Result<Self> {
        if loader.rank_and_size().1 > 1 {
            return Err(Error::config(
                "config.json",
                "tensor parallelism is not supported for the Gemma decoders yet (PaliGemma, Gemma 3): run them with --tensor-parallel-size 1",
            ));
        }
        let c = &config;
        let layers = (0..c.num_hidden_layers)
            .map(|i| GemmaDecoderLayer::load(&loader.pp("layers").pp(i), i, c))
            .collect::<Result<_>>()?;
        let device = loader.options.device;
        let embed_tokens =
            Embedding::load(&loader.pp("embed_tokens"), c.vocab_size, c.hidden_size)?;
        let lm_head = if c.tie_word_embeddings {
            lm_head.skip_all();
            Linear::from_weight(embed_tokens.weight().shallow_clone(), None)
        } else {
            Linear::load(lm_head, c.hidden_size, c.vocab_size, false)?
        };
        let dtype = embed_tokens.weight().kind();
        let embed_scale = Tensor::from((c.hidden_size as f64).sqrt() as f32)
            .to_kind(dtype)
            .to_device(device);
        let rotary =
            |(theta, kind): (f64, RopeKind)| RotaryEmbedding::new(c.head_dim, theta, kind, device);
        Ok(Self {
            embed_tokens,
            embed_scale,
            layers,
            norm: GemmaRmsNorm::load(&loader.pp("norm"), c.hidden_size, c.rms_norm_eps)?,
            lm_head,
            rotary_emb: rotary(c.rope),
            rotary_emb_local: rotary(c.local_rope),
            position_offset: 0,
            device,
            config,
        })
    }

    /// Rotary positions start at `offset` instead of 0 (PaliGemma's are 1-indexed).
    pub fn with_position_offset(self, offset: i64) -> Self {
        Self {
            position_offset: offset,
            ..self
        }
    }
}

impl LanguageModel for Gemma {
    /// Scaled token embeddings. Ids past the vocabulary embed as id 0: they can only be placeholders
    /// (PaliGemma's `<image>` is one past the vocabulary), whose rows the vision features replace.
    fn embed_tokens(&self, token_ids: &Tensor) -> Result<Tensor> {
        let ids = token_ids.masked_fill(&token_ids.ge(self.config.vocab_size), 0);
        Ok(self.embed_tokens.forward(&ids)? * &self.embed_scale)
    }

    fn forward(&self, inputs_embeds: &Tensor, step: &mut Step) -> Result<Tensor> {
        let kind = inputs_embeds.kind();
        let positions = step.positions() + self.position_offset;
        let rotary = self.rotary_emb.at(&positions, kind);
        let local = self
            .layers
            .iter()
            .any(|l| l.sliding)
            .then(|| self.rotary_emb_local.at(&positions, kind));
        let mut hidden = inputs_embeds.shallow_clone();
        for layer in &self.layers {
            let rotary = match (&local, layer.sliding) {
                (Some(local), true) => local,
                _ => &rotary,
            };
            hidden = layer.forward(&hidden, rotary, step)?;
        }
        let normed = self.norm.forward(&hidden);
        let logits = self.lm_head.forward(&step.logits_rows(normed)?);
        Ok(match self.config.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        })
    }

    fn kv_cache_spec(&self) -> KvCacheSpec {
        let c = &self.config;
        let spec = KvCacheSpec::new(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            self.dtype(),
        );
        // Every sliding layer of a Gemma decoder has the same window.
        let sliding: Vec<usize> = (0..c.num_hidden_layers)
            .filter(|&l| c.windows[l].is_some())
            .collect();
        match sliding.first().and_then(|&l| c.windows[l]) {
            Some(window) => spec.with_sliding_window(window, sliding),
            None => spec,
        }
    }

    fn device(&self) -> Device {
        self.device
    }

    fn dtype(&self) -> Kind {
        self.embed_tokens.weight().kind()
    }

    fn max_model_len(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn supports_cuda_graphs(&self) -> bool {
        true
    }
}
