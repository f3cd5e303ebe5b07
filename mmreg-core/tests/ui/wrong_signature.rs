use mmreg_core::{register_dummy_data, register_max_tokens, ModelContext};

#[register_max_tokens(image = max_image_tokens)]
#[register_dummy_data(dummy_data)]
pub struct Model;

// Returns a bare number instead of `mmreg_core::Result<usize>`.
fn max_image_tokens(_ctx: &ModelContext) -> usize {
    576
}

// Takes a sequence length instead of `(&ModelContext, &DummyRequest)`.
fn dummy_data(_seq_len: usize) -> mmreg_core::ProcessorInputs {
    unreachable!()
}

fn main() {}
