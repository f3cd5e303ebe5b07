//! `--limit-mm-per-prompt`: how many items of each modality a prompt may carry, and optionally how large
//! each may be. Startup profiling sizes its dummy data by these limits (a deployment that sends one small
//! image does not reserve memory for four of the largest), and a request over them gets a clear error.

use std::collections::BTreeMap;

use mmreg_core::{Error, ImageSize, Modality, MultiModalData, Result};

/// Items a prompt may carry by default, per modality.
pub const DEFAULT_ITEMS_PER_PROMPT: usize = 4;

/// One modality's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModalityLimit {
    pub count: usize,
    /// The largest image (or video frame) accepted; `None`: whatever the processor takes.
    pub largest: Option<ImageSize>,
}

impl Default for ModalityLimit {
    fn default() -> Self {
        Self {
            count: DEFAULT_ITEMS_PER_PROMPT,
            largest: None,
        }
    }
}

/// The limits of every modality; one not named has the default ([`DEFAULT_ITEMS_PER_PROMPT`] items of
/// any size).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MultiModalLimits(pub BTreeMap<Modality, ModalityLimit>);

impl MultiModalLimits {
    /// `count` items of any size for every modality.
    pub fn each(count: usize) -> Self {
        Self(
            Modality::ALL
                .iter()
                .map(|&m| {
                    (
                        m,
                        ModalityLimit {
                            count,
                            largest: None,
                        },
                    )
                })
                .collect(),
        )
    }

    pub fn get(&self, modality: Modality) -> ModalityLimit {
        self.0.get(&modality).copied().unwrap_or_default()
    }

    /// The most items of any one modality.
    pub fn max_count(&self) -> usize {
        Modality::ALL
            .iter()
            .map(|&m| self.get(m).count)
            .max()
            .unwrap_or(0)
    }

    /// Parses vLLM's forms: `image=2,video=1`, `{"image": 2}`, or with a size,
    /// `{"image": {"count": 1, "width": 512, "height": 512}}`.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut limits = Self::default();
        if text.trim_start().starts_with('{') {
            let map: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(text).map_err(|e| format!("`{text}`: {e}"))?;
            for (key, value) in map {
                let modality: Modality = key.parse()?;
                let limit = match &value {
                    serde_json::Value::Number(n) => ModalityLimit {
                        count: n
                            .as_u64()
                            .ok_or_else(|| format!("{key}: `{value}` is not a count"))?
                            as usize,
                        largest: None,
                    },
                    serde_json::Value::Object(fields) => {
                        let field = |name: &str| -> std::result::Result<Option<u64>, String> {
                            match fields.get(name) {
                                None => Ok(None),
                                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                                    format!("{key}.{name}: `{v}` is not a whole number")
                                }),
                            }
                        };
                        if let Some(unknown) = fields
                            .keys()
                            .find(|k| !["count", "width", "height"].contains(&k.as_str()))
                        {
                            return Err(format!(
                                "{key}.{unknown}: unknown (expected count, width, height)"
                            ));
                        }
                        let largest = match (field("width")?, field("height")?) {
                            (Some(w), Some(h)) if w > 0 && h > 0 => Some(ImageSize {
                                width: w as u32,
                                height: h as u32,
                            }),
                            (None, None) => None,
                            _ => {
                                return Err(format!(
                                    "{key}: give both width and height, each at least 1"
                                ))
                            }
                        };
                        ModalityLimit {
                            count: field("count")?.map_or(DEFAULT_ITEMS_PER_PROMPT, |c| c as usize),
                            largest,
                        }
                    }
                    _ => return Err(format!("{key}: `{value}` is not a count or an object")),
                };
                limits.0.insert(modality, limit);
            }
        } else {
            for pair in text.split(',') {
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("`{pair}`: expected MODALITY=N"))?;
                let modality: Modality = key.trim().parse()?;
                let count = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("{}: `{value}` is not a count", key.trim()))?;
                limits.0.insert(
                    modality,
                    ModalityLimit {
                        count,
                        largest: None,
                    },
                );
            }
        }
        Ok(limits)
    }

    /// Checks a number of items of one modality against its limit (before they are decoded).
    pub fn check_count(&self, modality: Modality, n: usize) -> Result<()> {
        let most = self.get(modality).count;
        if n > most {
            return Err(Error::bad_input(
                "request",
                format!(
                    "{n} {modality}s given but at most {most} are allowed per prompt (--limit-mm-per-prompt)"
                ),
            ));
        }
        Ok(())
    }

    /// Checks a request's items against the limits.
    pub fn check(&self, data: &MultiModalData) -> Result<()> {
        for &modality in Modality::ALL {
            self.check_count(modality, data.len(modality))?;
            let Some(largest) = self.get(modality).largest else {
                continue;
            };
            for item in data.items(modality) {
                let (name, size) = match item {
                    mmreg_core::MultiModalItem::Image(image) => (&image.name, image.size()),
                    mmreg_core::MultiModalItem::Video(video) => (
                        &video.name,
                        video.frames.first().map_or(
                            ImageSize {
                                width: 0,
                                height: 0,
                            },
                            |f| ImageSize {
                                width: f.width(),
                                height: f.height(),
                            },
                        ),
                    ),
                };
                if size.width > largest.width || size.height > largest.height {
                    return Err(Error::bad_input(
                        &**name,
                        format!(
                            "{}x{} is larger than the {}x{} this server's --limit-mm-per-prompt allows for {modality}s",
                            size.width, size.height, largest.width, largest.height
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Makes profiling's dummy items no larger than the limits (each image, or each video frame,
    /// replaced by a blank one of the size capped to the limit).
    pub fn cap_dummy(&self, data: &mut MultiModalData) {
        let cap = |image: &image::DynamicImage, largest: ImageSize| {
            image::DynamicImage::new_rgb8(
                image.width().min(largest.width),
                image.height().min(largest.height),
            )
        };
        if let Some(largest) = self.get(Modality::Image).largest {
            for image in &mut data.images {
                image.image = cap(&image.image, largest);
            }
        }
        if let Some(largest) = self.get(Modality::Video).largest {
            for video in &mut data.videos {
                for frame in &mut video.frames {
                    *frame = cap(frame, largest);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_in_vllms_forms() {
        let limits = MultiModalLimits::parse("image=2,video=0").unwrap();
        assert_eq!(limits.get(Modality::Image).count, 2);
        assert_eq!(limits.get(Modality::Video).count, 0);
        let limits =
            MultiModalLimits::parse(r#"{"image": {"count": 1, "width": 512, "height": 384}}"#)
                .unwrap();
        assert_eq!(
            limits.get(Modality::Image),
            ModalityLimit {
                count: 1,
                largest: Some(ImageSize {
                    width: 512,
                    height: 384
                })
            }
        );
        assert_eq!(limits.get(Modality::Video).count, DEFAULT_ITEMS_PER_PROMPT);
        assert!(MultiModalLimits::parse("audio=1")
            .unwrap_err()
            .contains("audio"));
        assert!(MultiModalLimits::parse("image").is_err());
        assert!(MultiModalLimits::parse(r#"{"image": {"width": 5}}"#)
            .unwrap_err()
            .contains("both width and height"));
        assert!(MultiModalLimits::parse(r#"{"image": {"size": 5}}"#)
            .unwrap_err()
            .contains("image.size"));
    }

    #[test]
    fn requests_over_the_limits_are_refused_by_name() {
        let limits =
            MultiModalLimits::parse(r#"{"image": {"count": 1, "width": 64, "height": 64}}"#)
                .unwrap();
        let image =
            |w, h| mmreg_core::ImageInput::new("pic.png", image::DynamicImage::new_rgb8(w, h));
        assert!(limits
            .check(&MultiModalData::with_images(vec![image(64, 64)]))
            .is_ok());
        let two = limits
            .check(&MultiModalData::with_images(vec![image(8, 8), image(8, 8)]))
            .unwrap_err()
            .to_string();
        assert!(two.contains("2 images given but at most 1"), "{two}");
        let large = limits
            .check(&MultiModalData::with_images(vec![image(65, 10)]))
            .unwrap_err()
            .to_string();
        assert!(
            large.contains("pic.png") && large.contains("65x10") && large.contains("64x64"),
            "{large}"
        );
        let mut dummy = MultiModalData::with_images(vec![image(336, 20)]);
        limits.cap_dummy(&mut dummy);
        assert_eq!(
            (
                dummy.images[0].image.width(),
                dummy.images[0].image.height()
            ),
            (64, 20)
        );
    }
}
