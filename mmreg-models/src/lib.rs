//! Multimodal architectures for mmreg. Each model registers itself with mmreg's macros; binaries and
//! tests link this crate (`use mmreg_models as _;`) to make them visible in the registry.

mod clip;
#[doc(hidden)]
pub mod fuzz;
mod layers;
mod llama;
pub mod llava;
pub mod llava_next;

pub use llava::{Llava, LlavaConfig};
pub use llava_next::{LlavaNext, LlavaNextConfig};
