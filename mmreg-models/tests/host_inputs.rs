//! The metadata each model reads as numbers (image sizes, grids, crop counts) is declared
//! `#[inputs(host)]`, and the registry reports it: the engine then leaves it on the host instead of
//! uploading it for the model to read back, which would make the host wait for the device.

use mmreg_core::{Modality, Registry};
use mmreg_models as _;

#[test]
fn each_models_metadata_stays_on_the_host() {
    let expected: &[(&str, Modality, &[&str])] = &[
        ("LlavaForConditionalGeneration", Modality::Image, &[]),
        (
            "LlavaNextForConditionalGeneration",
            Modality::Image,
            &["image_sizes"],
        ),
        (
            "Qwen2VLForConditionalGeneration",
            Modality::Image,
            &["image_grid_thw"],
        ),
        (
            "Qwen2VLForConditionalGeneration",
            Modality::Video,
            &["video_grid_thw"],
        ),
        (
            "Qwen2_5_VLForConditionalGeneration",
            Modality::Image,
            &["image_grid_thw"],
        ),
        (
            "Qwen2_5_VLForConditionalGeneration",
            Modality::Video,
            &["video_grid_thw"],
        ),
        ("PaliGemmaForConditionalGeneration", Modality::Image, &[]),
        (
            "Gemma3ForConditionalGeneration",
            Modality::Image,
            &["num_crops"],
        ),
        (
            "Idefics3ForConditionalGeneration",
            Modality::Image,
            &["image_grid"],
        ),
    ];
    for &(architecture, modality, host) in expected {
        let entry = Registry::global().find(architecture).expect("registered");
        let found = entry.host_params(modality).expect("a mapper");
        assert_eq!(found, host, "{architecture} ({modality})");
    }
}
