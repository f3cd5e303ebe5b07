//! Preprocessing speed on the three scikit-image photos (chelsea 451x300, astronaut 512x512,
//! coffee 600x400), with PNG decoding measured separately.
//!
//! `cargo bench -p mmreg-image --bench preprocess` (single thread), and the `*_2threads` groups
//! report images/s with the work split over two threads.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use image::{DynamicImage, RgbImage};
use mmreg_image::{ClipImageProcessor, LlavaNextImageProcessor, PreprocessorConfig};

const PHOTOS: [&str; 3] = ["chelsea", "astronaut", "coffee"];

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures"))
}

fn config(dir: &str) -> PreprocessorConfig {
    PreprocessorConfig::from_file(
        fixtures()
            .join("configs")
            .join(dir)
            .join("preprocessor_config.json"),
    )
    .expect("fixture config")
}

fn photo_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(format!("{name}.png"))).expect("fixture photo")
}

fn photos() -> Vec<(&'static str, RgbImage)> {
    PHOTOS
        .iter()
        .map(|&name| {
            (
                name,
                image::load_from_memory(&photo_bytes(name))
                    .expect("decode")
                    .to_rgb8(),
            )
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_png");
    for name in PHOTOS {
        let bytes = photo_bytes(name);
        group.bench_function(name, |b| {
            b.iter(|| image::load_from_memory(black_box(&bytes)).expect("decode"))
        });
    }
    group.finish();
}

fn single_thread(c: &mut Criterion) {
    let clip = ClipImageProcessor::new(&config("llava-1.5")).expect("clip");
    let next = LlavaNextImageProcessor::new(&config("llava-v1.6")).expect("next");
    let photos = photos();
    let mut group = c.benchmark_group("clip");
    for (name, img) in &photos {
        group.bench_with_input(BenchmarkId::from_parameter(name), img, |b, img| {
            b.iter(|| clip.preprocess_rgb(black_box(img)).expect("clip"))
        });
    }
    group.finish();
    let mut group = c.benchmark_group("llava_next");
    for (name, img) in &photos {
        let img = DynamicImage::ImageRgb8(img.clone());
        group.bench_with_input(BenchmarkId::from_parameter(name), &img, |b, img| {
            b.iter(|| next.preprocess(black_box(img)).expect("next"))
        });
    }
    group.finish();
}

/// Runs `per_image` on `images` split over `threads` scoped threads, `iters` times.
fn parallel<T: Sync, F: Fn(&T) + Sync>(
    images: &[T],
    threads: usize,
    iters: u64,
    per_image: F,
) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let per_image = &per_image;
            s.spawn(move || {
                for _ in 0..iters {
                    for img in images.iter().skip(t).step_by(threads) {
                        per_image(img);
                    }
                }
            });
        }
    });
    start.elapsed()
}

fn two_threads(c: &mut Criterion) {
    let clip = ClipImageProcessor::new(&config("llava-1.5")).expect("clip");
    let next = LlavaNextImageProcessor::new(&config("llava-v1.6")).expect("next");
    // 12 images (each photo 4 times), 6 per thread.
    let batch: Vec<RgbImage> = photos()
        .into_iter()
        .map(|(_, img)| img)
        .cycle()
        .take(12)
        .collect();
    let mut group = c.benchmark_group("clip_2threads");
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("photos_x12", |b| {
        b.iter_custom(|iters| {
            parallel(&batch, 2, iters, |img| {
                black_box(clip.preprocess_rgb(img).expect("clip"));
            })
        })
    });
    group.finish();
    let dynamic: Vec<DynamicImage> = batch.iter().cloned().map(DynamicImage::ImageRgb8).collect();
    let mut group = c.benchmark_group("llava_next_2threads");
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("photos_x12", |b| {
        b.iter_custom(|iters| {
            parallel(&dynamic, 2, iters, |img| {
                black_box(next.preprocess(img).expect("next"));
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3));
    targets = decode, single_thread, two_threads
}
criterion_main!(benches);
