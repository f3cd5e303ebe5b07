//! What the registration macros' generated code calls. Not a public API: names may change in any release.

pub use linkme;
pub use tch;

pub use crate::defaults::ModalityDefaults;

pub use crate::registry::{Hook, Location, ModelId, Registration, REGISTRATIONS};

use tch::Tensor;

use crate::inputs::MultiModalData;
use crate::model::{LoadModel, LoadOptions, ModalityKind, MultiModalModel, SupportsModality};
use crate::processors::DefaultMapper;
use crate::tensors::ModalityInputs;
use crate::weights::Weights;
use crate::{Error, ModelContext, Result, TensorMap};

/// The type-checked signature of a custom input mapper for model `M` and modality `K`.
pub type MapperOf<M, K> =
    fn(&ModelContext, &[<K as ModalityKind>::Item]) -> Result<<M as SupportsModality<K>>::Inputs>;

pub fn load<M: LoadModel>(
    ctx: &ModelContext,
    weights: &Weights,
    options: &LoadOptions,
) -> Result<Box<dyn MultiModalModel>> {
    Ok(Box::new(M::load(ctx, weights, options)?))
}

pub fn map_with<M: SupportsModality<K>, K: ModalityKind>(
    mapper: MapperOf<M, K>,
    ctx: &ModelContext,
    data: &MultiModalData,
) -> Result<TensorMap> {
    Ok(mapper(ctx, K::items(data))?.into_tensors())
}

pub fn map_default<M, K>(ctx: &ModelContext, data: &MultiModalData) -> Result<TensorMap>
where
    M: SupportsModality<K>,
    K: ModalityKind,
    M::Inputs: DefaultMapper<K>,
{
    Ok(<M::Inputs as DefaultMapper<K>>::map(ctx, K::items(data))?.into_tensors())
}

pub fn embed<M: SupportsModality<K>, K: ModalityKind>(
    model: &dyn MultiModalModel,
    inputs: TensorMap,
) -> Result<Vec<Tensor>> {
    let model = model.as_any().downcast_ref::<M>().ok_or_else(|| {
        Error::Model(format!(
            "the loaded model is not a `{}`",
            std::any::type_name::<M>()
        ))
    })?;
    model.embed(M::Inputs::from_tensors(inputs)?)
}

pub fn concat<M: SupportsModality<K>, K: ModalityKind>(
    parts: Vec<TensorMap>,
) -> Result<Option<TensorMap>> {
    let parts = parts
        .into_iter()
        .map(M::Inputs::from_tensors)
        .collect::<Result<Vec<_>>>()?;
    Ok(M::Inputs::concat(parts)?.map(ModalityInputs::into_tensors))
}

pub fn count<M: SupportsModality<K>, K: ModalityKind>(
    ctx: &ModelContext,
    data: &MultiModalData,
) -> Result<Vec<usize>> {
    K::items(data)
        .iter()
        .map(|item| M::num_tokens(ctx, item))
        .collect()
}

pub const fn params<M: SupportsModality<K>, K: ModalityKind>() -> &'static [&'static str] {
    <M::Inputs as ModalityInputs>::PARAMS
}

pub const fn host_params<M: SupportsModality<K>, K: ModalityKind>() -> &'static [&'static str] {
    <M::Inputs as ModalityInputs>::HOST
}

/// The defaults of modality `K` for model `M` (see [`ModalityDefaults`]).
pub const fn modality_defaults<M: SupportsModality<K>, K: ModalityKind>() -> ModalityDefaults {
    ModalityDefaults::of::<M, K>()
}

/// What `#[derive(ModalityInputs)]`'s `concat` calls per field (see [`crate::concat_tensors`]).
pub fn concat_tensors(tensors: Vec<Tensor>, pad_axis: Option<usize>) -> Result<Option<Tensor>> {
    crate::tensors::concat_tensors(&tensors, pad_axis)
}
