//! The models that came before the parity harness, through it: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and
//! Qwen2.5-VL on their existing tiny checkpoints, with the goldens `scripts/parity.py ARCH --checkpoint DIR`
//! wrote next to them (their own parity tests keep their earlier, model-specific goldens too).

mod support;

use mmreg_models as _;
use support::fixture;

fn check(name: &str) {
    let report = mmreg_parity::check(&fixture(name)).expect("runs");
    println!("{name}:\n{}", report.table());
    report.assert_passed();
}

#[test]
fn llava_through_the_harness() {
    check("llava-tiny-real");
}

#[test]
fn llava_next_through_the_harness() {
    check("llava-next-tiny-real");
}

#[test]
fn qwen2_vl_through_the_harness() {
    check("qwen2-vl-tiny");
}

#[test]
fn qwen2_5_vl_through_the_harness() {
    check("qwen2_5-vl-tiny");
}
