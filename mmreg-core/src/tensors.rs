//! The tensors an input mapper produces for one modality: the keyword parameters of the model's forward.

use std::collections::BTreeMap;

use tch::Tensor;

use crate::{Error, Result};

/// Named tensors, keyed by forward parameter name (`pixel_values`, `image_sizes`, …).
#[derive(Debug, Default)]
pub struct TensorMap(pub BTreeMap<String, Tensor>);

impl TensorMap {
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.0.insert(name.into(), tensor);
    }

    /// Removes and returns a parameter, with an error naming the model's expectation if it is absent.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.0.remove(name).ok_or_else(|| {
            let have: Vec<_> = self.0.keys().map(String::as_str).collect();
            Error::Registry(format!(
                "forward parameter `{name}` is missing from the mapped inputs (have: {have:?})"
            ))
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// The typed forward inputs of one modality. An input mapper returns this type and the model's embedding
/// function takes it, so rustc checks that the two fit; `TensorMap` is only the form they travel in.
pub trait ModalityInputs: Sized + 'static {
    /// Forward parameter names, as they appear in the `TensorMap`.
    const PARAMS: &'static [&'static str];

    fn into_tensors(self) -> TensorMap;

    fn from_tensors(tensors: TensorMap) -> Result<Self>;
}

/// `pixel_values` `[n, 3, H, W]` float32: the input of CLIP-style vision towers (LLaVA-1.5).
#[derive(Debug)]
pub struct PixelValues {
    pub pixel_values: Tensor,
}

impl ModalityInputs for PixelValues {
    const PARAMS: &'static [&'static str] = &["pixel_values"];

    fn into_tensors(self) -> TensorMap {
        let mut map = TensorMap::default();
        map.insert("pixel_values", self.pixel_values);
        map
    }

    fn from_tensors(mut tensors: TensorMap) -> Result<Self> {
        Ok(Self {
            pixel_values: tensors.take("pixel_values")?,
        })
    }
}

/// LLaVA-NeXT's image inputs, as HF's processor returns them: `pixel_values` `[n, max_patches, 3, H, W]`
/// (images with fewer patches padded with 0.0) and `image_sizes` `[n, 2]` i64, the original (height, width).
#[derive(Debug)]
pub struct AnyresPixelValues {
    pub pixel_values: Tensor,
    pub image_sizes: Tensor,
}

impl ModalityInputs for AnyresPixelValues {
    const PARAMS: &'static [&'static str] = &["image_sizes", "pixel_values"];

    fn into_tensors(self) -> TensorMap {
        let mut map = TensorMap::default();
        map.insert("pixel_values", self.pixel_values);
        map.insert("image_sizes", self.image_sizes);
        map
    }

    fn from_tensors(mut tensors: TensorMap) -> Result<Self> {
        Ok(Self {
            pixel_values: tensors.take("pixel_values")?,
            image_sizes: tensors.take("image_sizes")?,
        })
    }
}
