//! Multimodal architectures for mmreg (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL), each written on `mmreg-nn`'s building blocks and registered with
//! mmreg's macros. Binaries and tests link this crate (`use mmreg_models as _;`) to make them visible in
//! the registry.

#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod llava;
pub mod llava_next;
pub mod qwen2_5_vl;
pub mod qwen2_vl;

pub use llava::{Llava, LlavaConfig};
pub use llava_next::{AnyresPixelValues, LlavaNext, LlavaNextConfig};
pub use qwen2_5_vl::{Qwen25Vl, Qwen25VlConfig};
pub use qwen2_vl::{Qwen2Vl, Qwen2VlConfig};
