//! Weight loading by checkpoint name: a module asks for `weight` under its own prefix, so module code
//! names tensors the way the checkpoint does.

use mmreg_core::{LoadOptions, Result, Weights};
use tch::{Kind, Tensor};

/// Reads tensors under a name prefix, so module code names weights like the checkpoint does
/// (`vb.pp("layers").pp(3)` in candle's words).
#[derive(Clone)]
pub struct Loader<'a> {
    pub weights: &'a Weights,
    pub options: &'a LoadOptions,
    prefix: String,
}

impl<'a> Loader<'a> {
    pub fn new(weights: &'a Weights, options: &'a LoadOptions) -> Self {
        Self {
            weights,
            options,
            prefix: String::new(),
        }
    }

    /// The full name of `name` under this prefix.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A loader for the sub-module `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Loader<'a> {
        Loader {
            prefix: self.name(&name.to_string()),
            ..*self
        }
    }

    /// The same position in the checkpoint, loading with other options.
    pub fn with_options<'b>(&self, options: &'b LoadOptions) -> Loader<'b>
    where
        'a: 'b,
    {
        Loader {
            weights: self.weights,
            options,
            prefix: self.prefix.clone(),
        }
    }

    /// A tensor in the model's dtype, on its device, with a shape check.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.get_kind(name, shape, self.options.dtype)
    }

    pub fn get_kind(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        self.weights
            .get(&self.name(name), shape, kind, self.options.device)
    }

    /// Marks every tensor under this prefix as deliberately unread (e.g. CLIP's `post_layernorm`).
    pub fn skip_all(&self) {
        self.weights.skip_prefix(&self.prefix);
    }
}
