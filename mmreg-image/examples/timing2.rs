// TEMPORARY stage timing. Not to be committed.
use mmreg_image::*;
use std::time::Instant;
fn t(label: &str, f: impl Fn()) {
    let mut best = f64::MAX;
    for _ in 0..200 {
        let s = Instant::now();
        f();
        best = best.min(s.elapsed().as_secs_f64());
    }
    println!("{label:30} {:.3} ms", best * 1e3);
}
fn main() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");
    let rgb = image::open(format!("{root}/images/coffee.png"))
        .unwrap()
        .to_rgb8();
    t("H only 600->504 (400 rows)", || {
        std::hint::black_box(resize_bicubic(&rgb, 504, 400, PassOrder::Pillow13).unwrap());
    });
    t("V only 400->336 (600 cols)", || {
        std::hint::black_box(resize_bicubic(&rgb, 600, 336, PassOrder::Pillow13).unwrap());
    });
    t("full 504x336", || {
        std::hint::black_box(resize_bicubic(&rgb, 504, 336, PassOrder::Pillow13).unwrap());
    });
    let sq = image::RgbImage::new(336, 336);
    let clip = ClipImageProcessor::new(
        &PreprocessorConfig::from_json_str(r#"{"size": {"shortest_edge": 336}, "crop_size": 336}"#)
            .unwrap(),
    )
    .unwrap();
    t("clip on 336x336 (LUT only)", || {
        std::hint::black_box(clip.preprocess_rgb(&sq).unwrap());
    });
}
