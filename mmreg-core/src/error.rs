//! Typed errors for what callers act on: bad input, placeholder mismatches, over-long prompts, broken checkpoints.

use crate::Modality;

/// The result type of every registered function and of the library's public API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input item (an image) that cannot be decoded or processed.
    #[error("{input}: {reason}")]
    BadInput { input: String, reason: String },

    /// The prompt's placeholders and the multimodal items do not agree.
    #[error(
        "the prompt has {placeholders} `{marker}` placeholder(s) but {items} {modality} item(s) were given"
    )]
    PlaceholderMismatch {
        modality: Modality,
        marker: String,
        placeholders: usize,
        items: usize,
    },

    /// A registered function disagreed with the model's token-count function.
    #[error("{model}: {modality} item {item}: {what} has {actual} token(s) but the model's count is {expected}")]
    TokenCountMismatch {
        model: String,
        modality: Modality,
        item: usize,
        what: &'static str,
        actual: usize,
        expected: usize,
    },

    /// The processed prompt does not fit the model.
    #[error("the prompt is {len} tokens long (after placeholder expansion) but the model allows at most {max}")]
    PromptTooLong { len: usize, max: usize },

    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,

    /// config.json, preprocessor_config.json or another configuration value is invalid.
    #[error("{file}: {reason}")]
    Config { file: String, reason: String },

    /// A weight file is unreadable or a tensor is missing, unexpected or mis-shaped.
    #[error("{0}")]
    Weights(String),

    /// A registry lookup or validation failed.
    #[error("{0}")]
    Registry(String),

    /// A model's computation disagreed with what it declared (rows per item, mapped inputs, a shape).
    #[error("{0}")]
    Model(String),

    /// The engine cannot take or finish a request (stopped, out of KV-cache blocks, a panic in a step).
    #[error("{0}")]
    Engine(String),

    /// libtorch reported an error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),

    /// Anything else, with its context.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Error {
    pub fn bad_input(input: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::BadInput {
            input: input.into(),
            reason: reason.to_string(),
        }
    }

    pub fn config(file: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Config {
            file: file.into(),
            reason: reason.to_string(),
        }
    }
}
