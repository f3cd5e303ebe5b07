use mmreg_core::register_model;

#[register_model(LlavaForConditionalGeneration, "")]
pub struct Model;

fn main() {}
