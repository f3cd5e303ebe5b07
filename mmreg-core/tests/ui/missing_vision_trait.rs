use mmreg_core::register_input_mapper;

// The default image mapper needs to know the model's image inputs: `impl SupportsVision for Model`.
#[register_input_mapper(image)]
pub struct Model;

fn main() {}
