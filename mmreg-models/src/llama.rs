//! The Llama decoder (Mistral and Vicuna use the same code): RMSNorm in f32, half-split rotary
//! embeddings, grouped-query attention, gated MLP, with a preallocated KV cache.

use mmreg_core::attention::{attend_stored, paged_attention};
use mmreg_core::kernels;
use mmreg_core::{AttentionBatch, Error, KvCacheSpec, PagedKvCache, Result};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::layers::{Activation, Linear, Loader, RmsNorm};

/// `text_config` as written in config.json: every key optional, defaults depend on `model_type`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TextConfigJson {
    pub model_type: Option<String>,
    pub vocab_size: Option<i64>,
    pub hidden_size: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<i64>,
    pub num_key_value_heads: Option<i64>,
    pub head_dim: Option<i64>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    /// transformers 5 writes `rope_parameters: {rope_type, rope_theta}` instead of `rope_theta`.
    pub rope_parameters: Option<RopeParameters>,
    pub eos_token_id: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParameters {
    pub rope_type: Option<String>,
    pub rope_theta: Option<f64>,
}

/// The resolved decoder configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
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
    pub rope_theta: f64,
}

impl TextConfigJson {
    /// Fills missing keys with `LlamaConfig`'s or `MistralConfig`'s defaults.
    pub fn resolve(&self) -> Result<TextConfig> {
        let mistral = match self.model_type.as_deref() {
            None | Some("llama") => false,
            Some("mistral") => true,
            Some(other) => {
                return Err(Error::config(
                    "config.json",
                    format!("text_config.model_type `{other}` is not supported (llama, mistral)"),
                ))
            }
        };
        if let Some(kind) = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
        {
            if kind != "default" {
                return Err(Error::config(
                    "config.json",
                    format!("rope_type `{kind}` is not supported"),
                ));
            }
        }
        let hidden_size = self.hidden_size.unwrap_or(4096);
        let num_attention_heads = self.num_attention_heads.unwrap_or(32);
        let config = TextConfig {
            vocab_size: self.vocab_size.unwrap_or(32000),
            hidden_size,
            intermediate_size: self.intermediate_size.unwrap_or(if mistral {
                14336
            } else {
                11008
            }),
            num_hidden_layers: self.num_hidden_layers.unwrap_or(32),
            num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(if mistral {
                8
            } else {
                num_attention_heads
            }),
            head_dim: self
                .head_dim
                .unwrap_or(hidden_size / num_attention_heads.max(1)),
            hidden_act: self.hidden_act.clone().unwrap_or_else(|| "silu".into()),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(if mistral {
                4096 * 32
            } else {
                2048
            }),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: self
                .rope_parameters
                .as_ref()
                .and_then(|r| r.rope_theta)
                .or(self.rope_theta)
                .unwrap_or(10000.0),
        };
        let heads_ok = config.num_attention_heads > 0
            && config.num_key_value_heads > 0
            && config.num_attention_heads % config.num_key_value_heads == 0;
        if !heads_ok || config.head_dim % 2 != 0 {
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
}

struct Attention {
    /// `q_proj`, `k_proj` and `v_proj` stacked: one matrix multiply.
    qkv_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn load(loader: &Loader, c: &TextConfig) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
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
            o_proj: Linear::load(&loader.pp("o_proj"), q, h, false)?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: d,
        })
    }

    /// `x` is `[tokens, hidden]`, packed as `batch` describes.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        layer: usize,
        batch: &AttentionBatch,
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        let t = x.size()[0];
        let (h, kv) = (self.heads, self.kv_heads);
        let qkv = self
            .qkv_proj
            .forward(x)
            .view([t, h + 2 * kv, self.head_dim]);
        // Queries and keys rotate; values pass through unchanged (see `Rope`). Where the kernel runs, the
        // same pass stores the keys and values in the cache.
        let (keys, values) = cache.layer(layer);
        let stored = kernels::rope_and_store(
            &qkv,
            &rope.cos,
            &rope.sin,
            kv,
            keys,
            values,
            &batch.new_slots,
        );
        let in_cache = stored.is_some();
        let qkv = stored.unwrap_or_else(|| rope.apply(&qkv));
        let (q, k, v) = (
            qkv.narrow(1, 0, h),
            qkv.narrow(1, h, kv),
            qkv.narrow(1, h + kv, kv),
        );
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = if in_cache {
            attend_stored(&q, &k, &v, layer, batch, cache, scale)?
        } else {
            paged_attention(&q, &k, &v, layer, batch, cache, scale)?
        };
        Ok(self.o_proj.forward(&out.reshape([t, h * self.head_dim])))
    }
}

struct Mlp {
    /// `gate_proj` and `up_proj` stacked: one matrix multiply.
    gate_up_proj: Linear,
    down_proj: Linear,
    act: Activation,
    intermediate: i64,
}

impl Mlp {
    fn load(loader: &Loader, c: &TextConfig) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            gate_up_proj: Linear::load_stacked(
                &[(&loader.pp("gate_proj"), i), (&loader.pp("up_proj"), i)],
                h,
                false,
            )?,
            down_proj: Linear::load(&loader.pp("down_proj"), i, h, false)?,
            act: Activation::parse(&c.hidden_act)?,
            intermediate: i,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let gate_up = self.gate_up_proj.forward(x);
        let hidden = if self.act == Activation::Silu {
            kernels::silu_mul(&gate_up)
        } else {
            let i = self.intermediate;
            self.act.forward(&gate_up.narrow(-1, 0, i)) * gate_up.narrow(-1, i, i)
        };
        self.down_proj.forward(&hidden)
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// cos and sin of the rotary embedding at the step's positions, `[tokens, head_dim]` in the model dtype
/// (HF casts them before the products), and how many heads of the stacked q, k, v projection rotate.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    rotated_heads: i64,
}

impl Rope {
    /// `x * cos + rotate_half(x) * sin` on the query and key heads of `[tokens, heads + 2 kv_heads,
    /// head_dim]`; the value heads pass through. One kernel on CUDA.
    fn apply(&self, qkv: &Tensor) -> Tensor {
        kernels::rope(qkv, &self.cos, &self.sin, self.rotated_heads)
    }
}

/// The decoder stack with its embeddings and LM head.
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// `1 / theta^(2i/d)`, computed in f32 on the CPU as HF does.
    inv_freq: Tensor,
    pub config: TextConfig,
    device: Device,
}

impl Llama {
    /// Loads `language_model.*` (decoder) and `lm_head` from the canonical names.
    pub fn load(loader: &Loader, lm_head: &Loader, config: TextConfig) -> Result<Self> {
        let c = &config;
        let eps = c.rms_norm_eps;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = loader.pp("layers").pp(i);
                Ok(DecoderLayer {
                    input_layernorm: RmsNorm::load(&l.pp("input_layernorm"), c.hidden_size, eps)?,
                    self_attn: Attention::load(&l.pp("self_attn"), c)?,
                    post_attention_layernorm: RmsNorm::load(
                        &l.pp("post_attention_layernorm"),
                        c.hidden_size,
                        eps,
                    )?,
                    mlp: Mlp::load(&l.pp("mlp"), c)?,
                })
            })
            .collect::<Result<_>>()?;
        let exponent = Tensor::arange_start_step(0, c.head_dim, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / c.head_dim as f64;
        let inv_freq = Tensor::scalar_tensor(c.rope_theta, (Kind::Float, Device::Cpu))
            .pow(&exponent)
            .reciprocal();
        Ok(Self {
            embed_tokens: loader.get("embed_tokens.weight", &[c.vocab_size, c.hidden_size])?,
            layers,
            norm: RmsNorm::load(&loader.pp("norm"), c.hidden_size, eps)?,
            lm_head: Linear::load(lm_head, c.hidden_size, c.vocab_size, false)?,
            inv_freq: inv_freq.to_device(loader.options.device),
            device: loader.options.device,
            config,
        })
    }

    pub fn embed_tokens(&self, token_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, token_ids, -1, false, false)
    }

    pub fn dtype(&self) -> Kind {
        self.embed_tokens.kind()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn rope(&self, positions: &Tensor, kind: Kind) -> Rope {
        let c = &self.config;
        let freqs = positions.to_kind(Kind::Float).unsqueeze(1) * self.inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], 1);
        Rope {
            cos: emb.cos().to_kind(kind),
            sin: emb.sin().to_kind(kind),
            rotated_heads: c.num_attention_heads + c.num_key_value_heads,
        }
    }

    /// Logits of the rows `batch.logits_indices` selects, for `[tokens, hidden]` embeddings.
    pub fn forward(
        &self,
        inputs_embeds: &Tensor,
        batch: &AttentionBatch,
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        let rope = self.rope(&batch.positions, inputs_embeds.kind());
        // `residual` is the stream the layers add to; `normed` the next norm's output. Each residual add
        // is fused with the norm that follows it (the next layer's, or the final one).
        let mut residual = inputs_embeds.shallow_clone();
        let first_norm = self
            .layers
            .first()
            .map_or(&self.norm, |l| &l.input_layernorm);
        let mut normed = first_norm.forward(&residual);
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = layer.self_attn.forward(&normed, &rope, i, batch, cache)?;
            let (sum, mlp_in) = layer.post_attention_layernorm.forward_add(&residual, &attn);
            let mlp = layer.mlp.forward(&mlp_in);
            let next_norm = self
                .layers
                .get(i + 1)
                .map_or(&self.norm, |l| &l.input_layernorm);
            (residual, normed) = next_norm.forward_add(&sum, &mlp);
        }
        if let Some(rows) = &batch.logits_indices {
            normed = normed.index_select(0, rows);
        }
        Ok(self.lm_head.forward(&normed))
    }

    pub fn kv_cache_spec(&self) -> KvCacheSpec {
        let c = &self.config;
        KvCacheSpec {
            layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            kind: self.dtype(),
        }
    }
}
