//! Multimodal architectures for mmreg, each written on `mmreg-nn`'s building blocks and registered with
//! mmreg's macros. Binaries and tests link this crate (`use mmreg_models as _;`) to make them visible in
//! the registry.

#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod llava;
pub mod llava_next;

pub use llava::{Llava, LlavaConfig};
pub use llava_next::{AnyresPixelValues, LlavaNext, LlavaNextConfig};
