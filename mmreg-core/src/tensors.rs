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
            Error::Model(format!(
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

    /// The tensors moved by `to_device`, except those named in `host`, which stay as they are.
    pub fn to_device_except(
        self,
        host: &[&str],
        mut to_device: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        let moved = self.0.into_iter().map(|(name, t)| {
            let t = match host.contains(&name.as_str()) {
                true => t,
                false => to_device(&t)?,
            };
            Ok((name, t))
        });
        Ok(Self(moved.collect::<Result<_>>()?))
    }

    /// A copy sharing the tensors' storage.
    pub fn shallow_clone(&self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
        )
    }
}

/// The typed forward inputs of one modality. An input mapper returns this type and the model's embedding
/// function takes it, so rustc checks that the two fit; `TensorMap` is only the form they travel in.
pub trait ModalityInputs: Sized + 'static {
    /// Forward parameter names, as they appear in the `TensorMap`.
    const PARAMS: &'static [&'static str];

    /// The parameters that stay on the host: metadata the model reads as numbers (image sizes, grids,
    /// crop counts) rather than computes with. The engine moves every other tensor to the model's
    /// device, without waiting for the device; reading a device tensor back would make the host wait
    /// for everything queued before it. `#[inputs(host)]` on a field puts it here.
    const HOST: &'static [&'static str] = &[];

    fn into_tensors(self) -> TensorMap;

    fn from_tensors(tensors: TensorMap) -> Result<Self>;

    /// Several prompts' inputs as one, so that the model's multimodal path runs once for all their items
    /// (in order); `None` where they cannot be joined (the default: each prompt then runs alone).
    fn concat(parts: Vec<Self>) -> Result<Option<Self>> {
        let _ = parts;
        Ok(None)
    }
}

/// Joins tensors along their first axis, padding axis `pad_axis` of each with zeros to the largest;
/// `None` if any other axis differs. What `#[derive(ModalityInputs)]`'s `concat` does per field.
pub fn concat_tensors(tensors: &[Tensor], pad_axis: Option<usize>) -> Result<Option<Tensor>> {
    let Some(first) = tensors.first() else {
        return Ok(None);
    };
    let rank = first.dim();
    let widest = |axis: usize| tensors.iter().map(|t| t.size()[axis]).max().unwrap_or(0);
    let target: Vec<i64> = (0..rank)
        .map(|axis| {
            if Some(axis) == pad_axis {
                widest(axis)
            } else {
                first.size()[axis]
            }
        })
        .collect();
    let mut padded = Vec::with_capacity(tensors.len());
    for t in tensors {
        let size = t.size();
        if size.len() != rank || (1..rank).any(|a| Some(a) != pad_axis && size[a] != target[a]) {
            return Ok(None);
        }
        padded.push(match pad_axis {
            Some(axis) if size[axis] < target[axis] => {
                // `constant_pad_nd` lists (before, after) pairs from the last axis backwards.
                let mut pad = vec![0i64; 2 * (rank - axis)];
                pad[2 * (rank - 1 - axis) + 1] = target[axis] - size[axis];
                t.f_constant_pad_nd(pad.as_slice())?
            }
            _ => t.shallow_clone(),
        });
    }
    Ok(Some(Tensor::f_cat(&padded, 0)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_device_except_moves_all_but_the_host_tensors() {
        let mut inputs = TensorMap::default();
        for name in ["image_sizes", "pixel_values", "grid"] {
            inputs.insert(name, Tensor::from_slice(&[1i64, 2]));
        }
        let mut moved = Vec::new();
        let out = inputs
            .to_device_except(&["image_sizes", "grid"], |t| {
                moved.push(t.shallow_clone());
                Ok(t * 10)
            })
            .expect("moves");
        assert_eq!(moved.len(), 1);
        let values = |name: &str| Vec::<i64>::try_from(&out.0[name]).expect("i64");
        assert_eq!(values("pixel_values"), [10, 20]);
        assert_eq!(values("image_sizes"), [1, 2]);
        assert_eq!(values("grid"), [1, 2]);
    }

    #[test]
    fn to_device_except_passes_on_the_first_error() {
        let mut inputs = TensorMap::default();
        inputs.insert("pixel_values", Tensor::from_slice(&[1.0f32]));
        let error = inputs
            .to_device_except(&[], |_| Err(Error::Engine("no room on the device".into())))
            .expect_err("fails");
        assert!(
            error.to_string().contains("no room on the device"),
            "{error}"
        );
    }
}
