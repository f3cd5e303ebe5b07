//! LLaVA's multimodal projector (`multi_modal_projector`): linear → activation → linear, from the vision
//! tower's features to the language model's hidden size.

use mmreg_core::Result;
use tch::Tensor;

use crate::{Activation, Linear, Loader};

pub struct Projector {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
}

impl Projector {
    pub fn load(
        loader: &Loader,
        in_features: i64,
        hidden: i64,
        act: &str,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&loader.pp("linear_1"), in_features, hidden, bias)?,
            act: Activation::parse(act)?,
            linear_2: Linear::load(&loader.pp("linear_2"), hidden, hidden, bias)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(x)))
    }
}
