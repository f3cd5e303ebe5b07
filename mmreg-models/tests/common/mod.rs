//! Shared by the parity tests: the goldens made by transformers, and the comparison against them.

use mmreg_core::MultiModalModel;
use std::path::Path;

use mmreg_core::registry::ModelEntry;
use mmreg_engine::generate::{embed_prompt, generate, prefill_logits, PreparedInputs};
use mmreg_engine::SamplingParams;
use tch::Tensor;

/// `golden.safetensors` of a fixture.
pub struct Golden(Vec<(String, Tensor)>);

impl Golden {
    pub fn load(dir: &Path) -> Self {
        Golden(
            Tensor::read_safetensors(dir.join("golden.safetensors")).expect("golden.safetensors"),
        )
    }

    pub fn get(&self, key: &str) -> &Tensor {
        &self
            .0
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("golden has no `{key}`"))
            .1
    }

    #[allow(dead_code)] // only the tests whose goldens have optional keys ask
    pub fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    pub fn ids(&self, key: &str) -> Vec<i64> {
        Vec::<i64>::try_from(self.get(key).flatten(0, -1)).expect("i64 ids")
    }
}

/// Input ids, prefill logits at the golden's positions (relative error ≤ 1e-5), the argmax at every
/// position, and 20 greedy tokens, against HF's for `case`.
pub fn assert_matches_hf(
    entry: &ModelEntry,
    model: &dyn MultiModalModel,
    golden: &Golden,
    case: &str,
    inputs: impl Fn() -> PreparedInputs,
) {
    let _guard = tch::no_grad_guard();
    let prepared = inputs();
    let ids: Vec<i64> = prepared
        .processed
        .token_ids
        .iter()
        .map(|&t| t as i64)
        .collect();
    assert_eq!(
        ids,
        golden.ids(&format!("{case}.input_ids")),
        "{case}: input_ids differ from HF's"
    );

    let embeds = embed_prompt(entry, model, prepared).expect("embeds");
    let logits = prefill_logits(model, &embeds).expect("prefill");
    let expected = golden.get(&format!("{case}.logits"));
    let actual = logits.index_select(0, golden.get(&format!("{case}.logit_positions")));
    let error =
        (&actual - expected).abs().max().double_value(&[]) / expected.abs().max().double_value(&[]);
    assert!(
        error <= 1e-5,
        "{case}: prefill logits relative error {error:e} > 1e-5"
    );
    let argmax = Vec::<i64>::try_from(logits.argmax(-1, false)).expect("argmax");
    assert_eq!(
        argmax,
        golden.ids(&format!("{case}.logits_argmax")),
        "{case}: argmax differs at some position"
    );

    let params = SamplingParams {
        max_tokens: 20,
        ..SamplingParams::default()
    };
    let generated = generate(entry, model, inputs(), &params).expect("generates");
    let generated: Vec<i64> = generated.token_ids.iter().map(|&t| t as i64).collect();
    assert_eq!(
        generated,
        golden.ids(&format!("{case}.generated")),
        "{case}: greedy tokens differ from HF's"
    );
}
