//! Bad image files get a typed error that names the input, never a panic or a huge allocation.

use mmreg_core::{Error, ImageInput};

/// A PNG that claims `width` x `height` pixels but carries a few bytes of image data.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (&b"IHDR"[..], &ihdr[..]),
        (b"IDAT", &[0x78, 0x9c, 0x03, 0x00][..]),
        (b"IEND", &[][..]),
    ] {
        let chunk = [kind, data].concat();
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&chunk);
        bytes.extend_from_slice(&crc32fast::hash(&chunk).to_be_bytes());
    }
    bytes
}

fn error(name: &str, bytes: &[u8]) -> String {
    match ImageInput::decode(name, bytes) {
        Err(error @ Error::BadInput { .. }) => error.to_string(),
        Err(other) => panic!("{name}: not a BadInput error: {other:?}"),
        Ok(image) => panic!(
            "{name}: decoded a {}x{} image",
            image.image.width(),
            image.image.height()
        ),
    }
}

#[test]
fn decompression_bomb_is_refused_from_its_header() {
    let message = error("bomb.png", &png_header(100_000, 100_000));
    assert_eq!(
        message,
        "bomb.png: the image is 100000x100000 = 10000000000 pixels, over the limit of 67108864"
    );
}

#[test]
fn zero_width_image_is_refused() {
    let message = error("empty.png", &png_header(0, 10));
    assert!(message.starts_with("empty.png: "), "{message}");
}

#[test]
fn truncated_and_corrupt_images_are_refused() {
    let mut image = Vec::new();
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 10, 10]))
        .write_to(
            &mut std::io::Cursor::new(&mut image),
            image::ImageFormat::Png,
        )
        .expect("encodes");
    assert!(ImageInput::decode("ok.png", &image).is_ok());
    let message = error("truncated.png", &image[..image.len() / 2]);
    assert!(message.starts_with("truncated.png: "), "{message}");
    let mut corrupt = image.clone();
    for byte in corrupt.iter_mut().skip(40).step_by(7) {
        *byte ^= 0x5a;
    }
    let message = error("corrupt.png", &corrupt);
    assert!(message.starts_with("corrupt.png: "), "{message}");
}

#[test]
fn unsupported_format_is_refused() {
    let message = error("notes.txt", b"these are not pixels");
    assert!(
        message.starts_with("notes.txt: ") && message.contains("format"),
        "{message}"
    );
}

#[test]
fn missing_file_names_the_path() {
    let message = ImageInput::open("/nonexistent/cat.png")
        .expect_err("missing")
        .to_string();
    assert!(message.starts_with("/nonexistent/cat.png: "), "{message}");
}
