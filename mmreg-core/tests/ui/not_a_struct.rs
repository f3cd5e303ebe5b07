use mmreg_core::register_dummy_data;

#[register_dummy_data(dummy_data)]
fn dummy_data() {}

fn main() {}
