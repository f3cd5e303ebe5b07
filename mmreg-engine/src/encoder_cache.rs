//! Content hashes of multimodal items, and the encoder cache: what a modality's path (the vision tower
//! and projector) returned for an item, kept by the item's hash so that the same image is encoded once,
//! whichever request sends it, however its prompt is chunked, and after its sequence is preempted.

use std::collections::{BTreeMap, HashMap};

use image::DynamicImage;
use tch::Tensor;

use mmreg_core::{ModelContext, MultiModalItem};

use crate::block_pool::Hash;

/// What an item's encoding depends on besides its pixels: the checkpoint's model and processor
/// configuration (one engine serves one checkpoint, so this is constant; it keeps hashes from meaning
/// the same thing across checkpoints).
pub fn processor_settings(ctx: &ModelContext) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(ctx.config_json().to_string().as_bytes());
    hasher.update(ctx.processor_config_json().to_string().as_bytes());
    *hasher.finalize().as_bytes()
}

fn hash_image(hasher: &mut blake3::Hasher, image: &DynamicImage) {
    hasher.update(&image.width().to_le_bytes());
    hasher.update(&image.height().to_le_bytes());
    hasher.update(format!("{:?}", image.color()).as_bytes());
    hasher.update(image.as_bytes());
}

/// An item's content hash: BLAKE3 over the processor settings, its modality and its decoded pixels
/// (and a video's frame rate), so the same picture sent as PNG or as JPEG-decoded-to-the-same-pixels
/// hashes the same, and any changed pixel does not.
pub fn item_hash(settings: &Hash, item: MultiModalItem) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(settings);
    match item {
        MultiModalItem::Image(image) => {
            hasher.update(b"image");
            hash_image(&mut hasher, &image.image);
        }
        MultiModalItem::Video(video) => {
            hasher.update(b"video");
            hasher.update(&(video.frames.len() as u64).to_le_bytes());
            hasher.update(&video.fps.unwrap_or(-1.0).to_le_bytes());
            for frame in &video.frames {
                hash_image(&mut hasher, frame);
            }
        }
    }
    *hasher.finalize().as_bytes()
}

struct Entry {
    features: Tensor,
    bytes: usize,
    used_at: u64,
}

/// Encoder outputs by item hash, at most `capacity` bytes, least recently used evicted first.
pub struct EncoderCache {
    capacity: usize,
    used: usize,
    entries: HashMap<Hash, Entry>,
    by_use: BTreeMap<u64, Hash>,
    clock: u64,
}

impl EncoderCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            used: 0,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            clock: 0,
        }
    }

    /// The features of an item seen before (a tensor sharing the cached storage).
    pub fn get(&mut self, hash: &Hash) -> Option<Tensor> {
        self.clock += 1;
        let entry = self.entries.get_mut(hash)?;
        self.by_use.remove(&entry.used_at);
        entry.used_at = self.clock;
        self.by_use.insert(self.clock, *hash);
        Some(entry.features.shallow_clone())
    }

    /// Keeps an item's features, evicting the least recently used until they fit; features larger than
    /// the whole cache are not kept.
    pub fn insert(&mut self, hash: Hash, features: &Tensor) {
        let bytes = features.numel() * features.kind().elt_size_in_bytes();
        if bytes > self.capacity || self.entries.contains_key(&hash) {
            return;
        }
        while self.used + bytes > self.capacity {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.used -= entry.bytes;
            }
        }
        self.clock += 1;
        self.by_use.insert(self.clock, hash);
        self.entries.insert(
            hash,
            Entry {
                features: features.shallow_clone(),
                bytes,
                used_at: self.clock,
            },
        );
        self.used += bytes;
    }

    pub fn bytes(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmreg_core::ImageInput;

    fn features(rows: i64) -> Tensor {
        Tensor::zeros([rows, 4], (tch::Kind::Float, tch::Device::Cpu))
    }

    #[test]
    fn the_least_recently_used_entry_goes_first_and_the_size_is_bounded() {
        // Room for two items of 2 rows x 4 floats (32 bytes each).
        let mut cache = EncoderCache::new(64);
        cache.insert([1; 32], &features(2));
        cache.insert([2; 32], &features(2));
        assert!(cache.get(&[1; 32]).is_some());
        cache.insert([3; 32], &features(2));
        assert!(
            cache.get(&[2; 32]).is_none(),
            "2 was the least recently used"
        );
        assert!(cache.get(&[1; 32]).is_some());
        assert!(cache.get(&[3; 32]).is_some());
        assert_eq!(cache.bytes(), 64);
        // Too large for the cache: not kept, nothing evicted.
        cache.insert([4; 32], &features(5));
        assert!(cache.get(&[4; 32]).is_none());
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn item_hashes_follow_pixels_and_settings() {
        let settings = [7; 32];
        let image = |value: u8| {
            let mut rgb = image::RgbImage::new(3, 2);
            rgb.put_pixel(1, 1, image::Rgb([value, 0, 0]));
            ImageInput::new("x", DynamicImage::ImageRgb8(rgb))
        };
        let (a, b) = (image(1), image(2));
        let hash = |s: &Hash, i: &ImageInput| item_hash(s, MultiModalItem::Image(i));
        assert_eq!(hash(&settings, &a), hash(&settings, &image(1)));
        assert_ne!(hash(&settings, &a), hash(&settings, &b));
        assert_ne!(hash(&settings, &a), hash(&[8; 32], &a));
    }
}
