//! Compile-fail tests: misuse of the registration macros is a compile error, spanned at the mistake.
//! Regenerate the expected output with `TRYBUILD=overwrite cargo test -p mmreg-core --test ui`.

#[test]
fn registration_misuse_fails_to_compile() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
