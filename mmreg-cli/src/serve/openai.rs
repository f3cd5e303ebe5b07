//! The OpenAI API's request and response bodies, as far as `mmreg serve` supports them (docs/serving.md
//! lists what is and is not). Unknown request fields that would change the output are refused, not
//! ignored.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ApiError;

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    /// Extension (vLLM): whether to end the prompt with the assistant's turn header (default true).
    pub add_generation_prompt: Option<bool>,
    /// Extension (vLLM): extra variables for the chat template.
    pub chat_template_kwargs: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptField,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// The legacy API's logprobs: how many top tokens per position (0 = only the chosen one's).
    pub logprobs: Option<usize>,
    /// Extension: image URLs (`data:`, `http(s)://`, `file://`) for the prompt's placeholders, in order.
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Fields both endpoints share.
#[derive(Debug, Deserialize)]
pub struct SamplingFields {
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension (vLLM); -1 or 0 turns it off.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub n: Option<usize>,
    /// Extensions (vLLM).
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Extension (vLLM): the generated (and prompt) token ids in the response.
    #[serde(default)]
    pub return_token_ids: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    TokenIds(Vec<u32>),
    /// A batch: only one prompt is supported.
    Texts(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// `name`, `tool_calls`, …: handed to the template as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object {
        url: String,
    },
    /// vLLM also takes the URL alone.
    Url(String),
}

impl ImageUrl {
    pub fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url } | ImageUrl::Url(url) => url,
        }
    }
}

/// Request fields that change nothing here and are accepted; any other unknown field that is set (not
/// null, not its neutral value) is refused with a 400 naming it.
const HARMLESS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "echo",
    "parallel_tool_calls",
];
const NEUTRAL: &[(&str, f64)] = &[
    ("frequency_penalty", 0.0),
    ("presence_penalty", 0.0),
    ("repetition_penalty", 1.0),
];

/// Refuses the unknown fields of a request that would change its output.
pub fn refuse_unsupported(other: &Map<String, Value>) -> Result<(), ApiError> {
    for (key, value) in other {
        let neutral = value.is_null()
            || HARMLESS.contains(&key.as_str())
            || NEUTRAL
                .iter()
                .any(|&(k, v)| k == key && value.as_f64() == Some(v))
            || (key == "echo" && value == &Value::Bool(false));
        if !neutral {
            return Err(ApiError::bad_request(format!(
                "`{key}` is not supported by this server (see docs/serving.md)"
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(completion: &mmreg_engine::Completion) -> Self {
        let (prompt_tokens, completion_tokens) =
            (completion.prompt_tokens, completion.token_ids.len());
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: completion.cached_tokens,
            },
        }
    }
}

/// One position of a chat completion's `logprobs.content`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// `logprobs` of a legacy completion choice.
#[derive(Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<Map<String, Value>>,
    pub text_offset: Vec<usize>,
}

/// The OpenAI model object of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_that_would_change_the_output_are_refused_by_name() {
        let ok: Map<String, Value> =
            serde_json::from_str(r#"{"user": "u", "frequency_penalty": 0, "tools": null}"#)
                .unwrap();
        assert!(refuse_unsupported(&ok).is_ok());
        let bad: Map<String, Value> =
            serde_json::from_str(r#"{"response_format": {"type": "json_object"}}"#).unwrap();
        let error = refuse_unsupported(&bad).expect_err("refused");
        assert!(
            error.message.contains("`response_format`"),
            "{}",
            error.message
        );
        let penalty: Map<String, Value> =
            serde_json::from_str(r#"{"presence_penalty": 0.5}"#).unwrap();
        assert!(refuse_unsupported(&penalty).is_err());
    }

    #[test]
    fn messages_take_text_or_parts_with_image_urls() {
        let request: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "What is this?"}
                ]}
            ],
            "max_tokens": 5, "stop": "\n", "stream": true
        }))
        .unwrap();
        assert_eq!(request.sampling.max_tokens, Some(5));
        assert!(request.sampling.stream);
        let Some(Content::Parts(parts)) = &request.messages[1].content else {
            panic!("parts")
        };
        assert!(
            matches!(&parts[0], ContentPart::ImageUrl { image_url } if image_url.url().starts_with("data:"))
        );
        assert!(request.other.is_empty(), "{:?}", request.other);
    }
}
