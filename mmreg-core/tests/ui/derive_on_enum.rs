use mmreg_core::ModalityInputs;

// The inputs of a modality are named tensors: a struct with named fields.
#[derive(ModalityInputs)]
pub enum Inputs {
    Pixels(tch::Tensor),
}

fn main() {}
