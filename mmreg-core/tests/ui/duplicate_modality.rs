use mmreg_core::register_input_mapper;

#[register_input_mapper(image, image = custom_mapper)]
pub struct Model;

fn main() {}
