//! The Llama decoder (`LlamaForCausalLM`'s model and head; Mistral, Vicuna and Qwen2 use the same code):
//! RMSNorm in f32, half-split rotary embeddings, grouped-query attention, gated MLP. Qwen2 adds biases to
//! the q/k/v projections, and Qwen2-VL multimodal rotary embeddings (M-RoPE, three rows of positions).

use mmreg_core::{Error, KvCacheSpec, LanguageModel, Result, Step};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::parallel::split_heads;
use crate::rotary::{RopeKind, RopeScaling, RotaryAt, RotaryEmbedding};
use crate::{Activation, Attention, Embedding, Linear, LmHead, Loader, RmsNorm, RowParallelLinear};

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
    /// transformers 5 writes `rope_parameters: {rope_type, rope_theta, …}` instead of `rope_theta` and
    /// `rope_scaling`.
    pub rope_parameters: Option<RopeScaling>,
    pub rope_scaling: Option<RopeScaling>,
    pub eos_token_id: Option<serde_json::Value>,
    /// Keys that change the numbers: implemented where this decoder can (`tie_word_embeddings`;
    /// `sliding_window`, by keeping sequences within the window), refused by name otherwise
    /// ([`TextConfigJson::refuse_unimplemented`]). Qwen2's q/k/v always have biases.
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<usize>,
    /// Qwen2's switch for `sliding_window`; off in the released Qwen2-VL checkpoints.
    pub use_sliding_window: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
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
    pub rope_kind: RopeKind,
    /// Biases on q_proj, k_proj and v_proj.
    pub qkv_bias: bool,
    /// The LM head reads the token embeddings (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Qwen2-VL's M-RoPE sections (`None`: one row of positions).
    pub mrope_section: Option<Vec<i64>>,
}

impl TextConfigJson {
    /// Fills missing keys with `LlamaConfig`'s or `MistralConfig`'s defaults.
    pub fn resolve(&self) -> Result<TextConfig> {
        let (mistral, qwen2) = match self.model_type.as_deref() {
            None | Some("llama") => (false, false),
            Some("mistral") => (true, false),
            Some("qwen2" | "qwen2_vl" | "qwen2_vl_text" | "qwen2_5_vl" | "qwen2_5_vl_text") => {
                (false, true)
            }
            Some(other) => {
                return Err(Error::config(
                    "config.json",
                    format!(
                        "text_config.model_type `{other}` is not supported (llama, mistral, qwen2, qwen2_vl_text, qwen2_5_vl_text)"
                    ),
                ))
            }
        };
        self.refuse_unimplemented(qwen2)?;
        let rope = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let rope_kind = RopeKind::from_config(rope)?;
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
            // Attention limited to a window changes nothing for sequences that fit in it: keeping every
            // sequence within the window computes what HF computes.
            max_position_embeddings: self
                .max_position_embeddings
                .unwrap_or(if mistral { 4096 * 32 } else { 2048 })
                .min(self.sliding_window.unwrap_or(usize::MAX)),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: self
                .rope_parameters
                .as_ref()
                .and_then(|r| r.rope_theta)
                .or(self.rope_theta)
                .unwrap_or(if qwen2 { 1_000_000.0 } else { 10000.0 }),
            rope_kind,
            qkv_bias: qwen2,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            mrope_section: rope.and_then(|r| r.mrope_section.clone()),
        };
        if let Some(sections) = &config.mrope_section {
            if sections.iter().sum::<i64>() * 2 != config.head_dim
                || sections.iter().any(|&s| s < 0)
            {
                return Err(Error::config(
                    "config.json",
                    format!(
                        "mrope_section {sections:?} must add up to head_dim / 2 = {}",
                        config.head_dim / 2
                    ),
                ));
            }
        }
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

impl TextConfigJson {
    /// An error naming each key set to a value this decoder does not compute, rather than results
    /// that silently differ from HF's.
    pub fn refuse_unimplemented(&self, qwen2: bool) -> Result<()> {
        let refused: Vec<&str> = [
            (
                self.attention_bias == Some(true) && !qwen2,
                "attention_bias: true",
            ),
            (self.mlp_bias == Some(true), "mlp_bias: true"),
            (
                self.use_sliding_window == Some(true),
                "use_sliding_window: true",
            ),
        ]
        .into_iter()
        .filter_map(|(set, key)| set.then_some(key))
        .collect();
        if refused.is_empty() {
            return Ok(());
        }
        Err(Error::config(
            "config.json",
            format!(
                "text_config: {} not supported by the Llama/Mistral decoder",
                refused.join(", ")
            ),
        ))
    }
}

/// `self_attn`: the stacked q/k/v projection, attention over the KV cache, `o_proj`. As a rank of a
/// tensor-parallel group it holds its share of the heads (`heads`, `kv_heads` are this rank's).
struct LlamaAttention {
    /// `q_proj`, `k_proj` and `v_proj` stacked: one matrix multiply.
    qkv_proj: Linear,
    o_proj: RowParallelLinear,
    attn: Attention,
    heads: i64,
    head_dim: i64,
}

impl LlamaAttention {
    fn load(loader: &Loader, layer: usize, c: &TextConfig) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let (rank, size) = loader.rank_and_size();
        let ((q0, heads), (kv0, kv_heads)) =
            split_heads(c.num_attention_heads, c.num_key_value_heads, rank, size)?;
        let rows = |first: i64, count: i64| (first * d, count * d);
        Ok(Self {
            qkv_proj: Linear::load_stacked_rows(
                &[
                    (&loader.pp("q_proj"), q, rows(q0, heads)),
                    (&loader.pp("k_proj"), kv, rows(kv0, kv_heads)),
                    (&loader.pp("v_proj"), kv, rows(kv0, kv_heads)),
                ],
                h,
                c.qkv_bias,
            )?,
            o_proj: RowParallelLinear::load(&loader.pp("o_proj"), q, h, false)?,
            attn: Attention::new(layer, heads, kv_heads, d),
            heads,
            head_dim: d,
        })
    }

    fn forward(&self, x: &Tensor, rotary: &RotaryAt, step: &mut Step) -> Result<Tensor> {
        let t = x.size()[0];
        let out = self
            .attn
            .forward_rotary_of(&self.qkv_proj, x, rotary, step)?;
        self.o_proj
            .forward(&out.reshape([t, self.heads * self.head_dim]))
    }
}

/// `mlp`: `down_proj(act(gate_proj(x)) * up_proj(x))`, gate and up stacked into one matrix multiply
/// (SwiGLU for Llama, GeGLU for Gemma); as a rank of a tensor-parallel group, its share of the
/// intermediate features.
pub(crate) struct Mlp {
    gate_up_proj: Linear,
    down_proj: RowParallelLinear,
    act: Activation,
}

impl Mlp {
    fn load(loader: &Loader, c: &TextConfig) -> Result<Self> {
        Self::load_sized(loader, c.hidden_size, c.intermediate_size, &c.hidden_act)
    }

    /// `hidden → intermediate → hidden` with the activation named `act`.
    pub(crate) fn load_sized(loader: &Loader, h: i64, i: i64, act: &str) -> Result<Self> {
        // Each rank's run of intermediate features (the last run shorter when `i` does not divide).
        let (rank, size) = loader.rank_and_size();
        let rows = mmreg_core::parallel::shard(i, rank, size);
        Ok(Self {
            gate_up_proj: Linear::load_stacked_rows(
                &[
                    (&loader.pp("gate_proj"), i, rows),
                    (&loader.pp("up_proj"), i, rows),
                ],
                h,
                false,
            )?,
            down_proj: RowParallelLinear::load(&loader.pp("down_proj"), i, h, false)?,
            act: Activation::parse(act)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj
            .forward(&self.gate_up_proj.forward_gated(x, self.act))
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: LlamaAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// `residual` is the stream the layers add to (`None` before the first layer); returns this layer's
    /// MLP output and the stream before it. Each residual add is fused with the norm after it.
    fn forward(
        &self,
        hidden: Tensor,
        residual: Option<Tensor>,
        rotary: &RotaryAt,
        step: &mut Step,
    ) -> Result<(Tensor, Tensor)> {
        let (residual, normed) = match residual {
            None => {
                let normed = self.input_layernorm.forward(&hidden);
                (hidden, normed)
            }
            Some(residual) => self.input_layernorm.forward_add(&residual, &hidden),
        };
        let attn = self.self_attn.forward(&normed, rotary, step)?;
        let (residual, normed) = self.post_attention_layernorm.forward_add(&residual, &attn);
        Ok((self.mlp.forward(&normed)?, residual))
    }
}

/// The decoder stack with its embeddings and LM head.
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: LmHead,
    rotary_emb: RotaryEmbedding,
    pub config: TextConfig,
    /// Key/value heads this rank keeps (all of them without tensor parallelism).
    kv_heads: i64,
    device: Device,
}

impl Llama {
    /// Loads `model.*` (embeddings, layers, norm) from `loader` and `lm_head` from its own loader (or
    /// the token embeddings, with `tie_word_embeddings`).
    pub fn load(loader: &Loader, lm_head: &Loader, config: TextConfig) -> Result<Self> {
        let c = &config;
        let eps = c.rms_norm_eps;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = loader.pp("layers").pp(i);
                Ok(DecoderLayer {
                    input_layernorm: RmsNorm::load(&l.pp("input_layernorm"), c.hidden_size, eps)?,
                    self_attn: LlamaAttention::load(&l.pp("self_attn"), i, c)?,
                    post_attention_layernorm: RmsNorm::load(
                        &l.pp("post_attention_layernorm"),
                        c.hidden_size,
                        eps,
                    )?,
                    mlp: Mlp::load(&l.pp("mlp"), c)?,
                })
            })
            .collect::<Result<_>>()?;
        let device = loader.options.device;
        let embed_tokens =
            Embedding::load(&loader.pp("embed_tokens"), c.vocab_size, c.hidden_size)?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still ship a copy as `lm_head.weight`; the embeddings are what HF reads.
            lm_head.skip_all();
            LmHead::tied(&embed_tokens)
        } else {
            LmHead::load(lm_head, c.hidden_size, c.vocab_size)?
        };
        let (rank, size) = loader.rank_and_size();
        let (_, (_, kv_heads)) =
            split_heads(c.num_attention_heads, c.num_key_value_heads, rank, size)?;
        let mut rotary_emb = RotaryEmbedding::new(c.head_dim, c.rope_theta, c.rope_kind, device);
        if let Some(sections) = &c.mrope_section {
            rotary_emb = rotary_emb.with_mrope_section(sections.clone());
        }
        // Positions count tokens from 0, below the longest sequence (the engine's bound).
        let rotary_emb =
            rotary_emb.with_table(c.max_position_embeddings, embed_tokens.weight().kind());
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(&loader.pp("norm"), c.hidden_size, eps)?,
            lm_head,
            rotary_emb,
            device,
            config,
            kv_heads,
        })
    }
}

impl LanguageModel for Llama {
    fn embed_tokens(&self, token_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(token_ids)
    }

    /// Logits `[rows, vocab]` of the rows the step asks for, for `[tokens, hidden]` embeddings.
    fn forward(&self, inputs_embeds: &Tensor, step: &mut Step) -> Result<Tensor> {
        let rotary = self.rotary_emb.at(step.positions(), inputs_embeds.kind());
        let mut hidden = inputs_embeds.shallow_clone();
        let mut residual = None;
        for layer in &self.layers {
            let (out, stream) = layer.forward(hidden, residual, &rotary, step)?;
            (hidden, residual) = (out, Some(stream));
        }
        let normed = match residual {
            Some(residual) => self.norm.forward_add(&residual, &hidden).1,
            None => self.norm.forward(&hidden),
        };
        self.lm_head.forward(&step.logits_rows(normed)?)
    }

    fn kv_cache_spec(&self) -> KvCacheSpec {
        let c = &self.config;
        KvCacheSpec::new(c.num_hidden_layers, self.kv_heads, c.head_dim, self.dtype())
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

    fn position_sections(&self) -> usize {
        self.rotary_emb.position_rows()
    }

    fn supports_cuda_graphs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod config_tests {
    use super::TextConfigJson;

    fn parse(json: serde_json::Value) -> TextConfigJson {
        serde_json::from_value(json).expect("parses")
    }

    #[test]
    fn keys_that_change_the_numbers_are_refused_by_name() {
        let error = parse(serde_json::json!({"attention_bias": true, "mlp_bias": true}))
            .resolve()
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains("attention_bias: true, mlp_bias: true not supported"),
            "{error}"
        );
        assert!(parse(serde_json::json!({"attention_bias": false}))
            .resolve()
            .is_ok());
    }

    #[test]
    fn a_sliding_window_keeps_sequences_within_it() {
        let config = parse(serde_json::json!({"model_type": "mistral", "max_position_embeddings": 32768, "sliding_window": 4096}))
            .resolve()
            .expect("resolves");
        assert_eq!(config.max_position_embeddings, 4096);
        let null = parse(serde_json::json!({"model_type": "mistral", "sliding_window": null}))
            .resolve()
            .expect("resolves");
        assert_eq!(null.max_position_embeddings, 4096 * 32);
    }
}
