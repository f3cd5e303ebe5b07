//! `generation_config.json`, as transformers and vLLM read it: the ids that end generation and the
//! default sampling parameters of a checkpoint.

use mmreg_core::{Error, ModelContext, Result};
use serde::Deserialize;

use crate::SamplingParams;

/// What a checkpoint says about generating: stop ids and the defaults a request that leaves a
/// parameter unset gets (vLLM's `--generation-config auto`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// `eos_token_id` (one id or a list) from generation_config.json, else from config.json (top level
    /// or `text_config`).
    pub eos_token_ids: Vec<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub max_new_tokens: Option<usize>,
    /// `do_sample: false` written in the file: greedy unless the request says otherwise.
    pub greedy: bool,
    /// Keys that change the numbers but are not implemented (`repetition_penalty`, …): ignored, and
    /// logged at startup.
    pub ignored: Vec<String>,
}

/// The keys of generation_config.json that are read; `ignored` lists the others that change sampling.
#[derive(Debug, Default, Deserialize)]
struct GenerationConfigJson {
    eos_token_id: Option<EosTokenId>,
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    max_new_tokens: Option<usize>,
    repetition_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    min_p: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EosTokenId {
    One(u32),
    Many(Vec<u32>),
}

impl EosTokenId {
    fn ids(self) -> Vec<u32> {
        match self {
            EosTokenId::One(id) => vec![id],
            EosTokenId::Many(ids) => ids,
        }
    }
}

impl GenerationConfig {
    /// Reads the checkpoint's generation_config.json (absent: config.json's `eos_token_id` only).
    pub fn from_context(ctx: &ModelContext) -> Result<Self> {
        let file = ctx.dir().map(|d| d.join("generation_config.json"));
        let json = match &file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => Some(serde_json::from_slice::<serde_json::Value>(&bytes).map_err(
                    |e| Error::config(path.display().to_string(), format!("invalid JSON: {e}")),
                )?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(Error::config(path.display().to_string(), e)),
            },
            None => None,
        };
        let label = || {
            file.as_ref()
                .map_or("generation_config.json".into(), |p| p.display().to_string())
        };
        Self::from_json(json.as_ref(), ctx.config_json()).map_err(|e| Error::config(label(), e))
    }

    /// From the parsed generation_config.json (if any) and config.json.
    pub fn from_json(
        generation: Option<&serde_json::Value>,
        config: &serde_json::Value,
    ) -> std::result::Result<Self, serde_json::Error> {
        let parsed = match generation {
            Some(json) => GenerationConfigJson::deserialize(json)?,
            None => GenerationConfigJson::default(),
        };
        let eos_token_ids = match parsed.eos_token_id {
            Some(eos) => eos.ids(),
            None => [
                config.get("eos_token_id"),
                config.pointer("/text_config/eos_token_id"),
            ]
            .into_iter()
            .flatten()
            .find_map(|v| EosTokenId::deserialize(v).ok())
            .map(EosTokenId::ids)
            .unwrap_or_default(),
        };
        let ignored = [
            ("repetition_penalty", parsed.repetition_penalty, 1.0),
            ("presence_penalty", parsed.presence_penalty, 0.0),
            ("frequency_penalty", parsed.frequency_penalty, 0.0),
            ("min_p", parsed.min_p, 0.0),
        ]
        .into_iter()
        .filter(|&(_, value, neutral)| value.is_some_and(|v| v != neutral))
        .map(|(key, value, _)| format!("{key} = {}", value.unwrap_or_default()))
        .collect();
        Ok(Self {
            eos_token_ids,
            temperature: parsed.temperature,
            top_p: parsed.top_p,
            top_k: parsed.top_k,
            max_new_tokens: parsed.max_new_tokens,
            greedy: parsed.do_sample == Some(false),
            ignored,
        })
    }

    /// Sampling parameters for a request that sets none: the file's values where it has them, else
    /// `fallback`'s (`do_sample: false` makes the default greedy); the EOS ids are the stop ids.
    pub fn default_params(&self, fallback: &SamplingParams) -> SamplingParams {
        let temperature = if self.greedy {
            0.0
        } else {
            self.temperature.unwrap_or(fallback.temperature)
        };
        SamplingParams {
            max_tokens: self.max_new_tokens.unwrap_or(fallback.max_tokens),
            temperature,
            top_p: self.top_p.unwrap_or(fallback.top_p),
            top_k: self.top_k.unwrap_or(fallback.top_k),
            stop_token_ids: self.eos_token_ids.clone(),
            ..fallback.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn eos_is_read_as_one_id_or_a_list_and_falls_back_to_config_json() {
        let config = json!({"text_config": {"eos_token_id": 7}});
        let one = GenerationConfig::from_json(Some(&json!({"eos_token_id": 2})), &config).unwrap();
        assert_eq!(one.eos_token_ids, vec![2]);
        let many =
            GenerationConfig::from_json(Some(&json!({"eos_token_id": [151645, 151643]})), &config)
                .unwrap();
        assert_eq!(many.eos_token_ids, vec![151645, 151643]);
        let none = GenerationConfig::from_json(None, &config).unwrap();
        assert_eq!(none.eos_token_ids, vec![7]);
    }

    #[test]
    fn sampling_defaults_come_from_the_file_and_unimplemented_keys_are_listed() {
        // Qwen2-VL-7B-Instruct's generation_config.json.
        let file = json!({"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": true,
            "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
            "top_k": 1, "top_p": 0.001});
        let config = GenerationConfig::from_json(Some(&file), &json!({})).unwrap();
        let params = config.default_params(&SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        });
        assert_eq!(
            (params.temperature, params.top_p, params.top_k),
            (0.1, 0.001, 1)
        );
        assert_eq!(params.stop_token_ids, vec![151645, 151643]);
        assert_eq!(
            config.ignored,
            vec!["repetition_penalty = 1.05".to_string()]
        );
        let greedy = GenerationConfig::from_json(Some(&json!({"do_sample": false})), &json!({}))
            .unwrap()
            .default_params(&SamplingParams {
                temperature: 1.0,
                ..SamplingParams::default()
            });
        assert_eq!(greedy.temperature, 0.0);
    }
}
