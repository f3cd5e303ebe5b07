//! The kinds of multimodal data a model can accept.

use std::fmt;

/// A modality: the key under which a model registers its input mapper, max tokens and forward parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Modality {
    Image,
}

impl Modality {
    /// Every modality, in the order the macros list them in errors.
    pub const ALL: &'static [Modality] = &[Modality::Image];

    /// The name used in attributes (`#[register_input_mapper(image)]`) and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Modality::Image => "image",
        }
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
