//! Multimodal architectures for mmreg (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and 2.5-VL, PaliGemma, Gemma 3, Idefics3 and SmolVLM), each written on `mmreg-nn`'s building blocks and registered with
//! mmreg's macros. Binaries and tests link this crate (`use mmreg_models as _;`) to make them visible in
//! the registry.

#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod gemma3;
pub mod idefics3;
pub mod llava;
pub mod llava_next;
pub mod paligemma;
pub mod qwen2_5_vl;
pub mod qwen2_vl;

pub use gemma3::{Gemma3, Gemma3Config};
pub use idefics3::{Idefics3, Idefics3Config};
pub use llava::{Llava, LlavaConfig};
pub use llava_next::{AnyresPixelValues, LlavaNext, LlavaNextConfig};
pub use paligemma::{PaliGemma, PaliGemmaConfig};
pub use qwen2_5_vl::{Qwen25Vl, Qwen25VlConfig};
pub use qwen2_vl::{Qwen2Vl, Qwen2VlConfig};
