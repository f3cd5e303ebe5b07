use mmreg_core::register_input_mapper;

#[register_input_mapper(imag)]
pub struct Model;

fn main() {}
