// TEMPORARY timing harness (min-of-N, robust to background load). Not to be committed.
use mmreg_image::*;
use std::time::Instant;
fn main() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");
    let clip =
        ClipImageProcessor::from_file(format!("{root}/configs/llava-1.5/preprocessor_config.json"))
            .unwrap();
    let next = LlavaNextImageProcessor::from_file(format!(
        "{root}/configs/llava-v1.6/preprocessor_config.json"
    ))
    .unwrap();
    for name in ["chelsea", "astronaut", "coffee"] {
        let img = image::open(format!("{root}/images/{name}.png")).unwrap();
        let rgb = img.to_rgb8();
        let mut best = f64::MAX;
        for _ in 0..1500 {
            let t = Instant::now();
            std::hint::black_box(clip.preprocess_rgb(&rgb).unwrap());
            best = best.min(t.elapsed().as_secs_f64());
        }
        if std::env::args().nth(1).as_deref() == Some("clip") {
            println!("{name:10} clip {:.3} ms", best * 1e3);
            continue;
        }
        let mut bestn = f64::MAX;
        for _ in 0..60 {
            let t = Instant::now();
            std::hint::black_box(next.preprocess(&img).unwrap());
            bestn = bestn.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{name:10} clip {:.3} ms  next {:.3} ms",
            best * 1e3,
            bestn * 1e3
        );
    }
}
