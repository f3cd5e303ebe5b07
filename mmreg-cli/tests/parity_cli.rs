//! The command line's contracts on the checkpoints of the parity harness (`scripts/parity.py`):
//! PaliGemma, Gemma 3, Idefics3 and SmolVLM. `models` lists them, `check` passes with their weights, `preprocess --out`
//! writes HF's tensors under HF's names, `generate --json` gives HF's greedy tokens (stopping at the
//! checkpoint's EOS as HF's `generate` would), and `mmreg parity` agrees with transformers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mmreg_parity::Goldens;
use serde_json::Value;
use tch::Tensor;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmreg"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("runs")
}

fn mmreg(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "mmreg {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The fixture's goldens, its tokenizer unpacked.
fn goldens(fixture: &str) -> Goldens {
    let dir = repo().join("fixtures").join(fixture);
    mmreg_parity::unpack_tokenizer(&dir).expect("tokenizer");
    Goldens::load(&dir).expect("goldens")
}

/// The checkpoint's EOS ids (generation_config.json, else config.json).
fn eos(dir: &Path) -> Vec<i64> {
    let read = |f: &str| -> Value {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    };
    let value = match read("generation_config.json")["eos_token_id"].clone() {
        Value::Null => read("config.json")["text_config"]["eos_token_id"].clone(),
        v => v,
    };
    match value {
        Value::Array(ids) => ids.iter().filter_map(Value::as_i64).collect(),
        Value::Number(n) => n.as_i64().into_iter().collect(),
        _ => Vec::new(),
    }
}

fn tensor<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

fn ids(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1).to_kind(tch::Kind::Int64)).expect("i64")
}

fn contracts(fixture: &str, architecture: &str, file: &str) {
    let g = goldens(fixture);
    let dir = format!("fixtures/{fixture}");

    let models = mmreg(&["models"]);
    let listed = models
        .lines()
        .filter(|l| !l.starts_with(' '))
        .find(|l| {
            let names = l.split("  (").next().unwrap_or("");
            names.split(", ").any(|n| n == architecture)
        })
        .unwrap_or_else(|| panic!("{architecture} not listed: {models}"));
    assert!(listed.contains("modalities: image"), "{listed}");
    assert!(
        models.contains(&format!("mmreg-models/src/{file}:")),
        "{file}: {models}"
    );

    let checked = mmreg(&["check", architecture, "--model-dir", &dir]);
    assert!(checked.starts_with("ok  "), "{checked}");

    let tmp = tempfile::tempdir().expect("temp dir");
    for case in g.meta.cases.iter().filter(|c| !c.images.is_empty()).take(2) {
        let images: Vec<String> = case.images.iter().map(|p| format!("{dir}/{p}")).collect();
        let with_images = |mut args: Vec<String>| {
            for image in &images {
                args.extend(["--image".into(), image.clone()]);
            }
            args
        };

        // preprocess --out: input_ids and the pixel values under HF's names, bit for bit.
        let out = tmp.path().join(format!("{}.safetensors", case.name));
        let out = out.to_str().expect("path").to_owned();
        let args = with_images(vec![
            "preprocess".into(),
            "--model".into(),
            dir.clone(),
            "--prompt".into(),
            case.text.clone(),
            "--out".into(),
            out.clone(),
        ]);
        mmreg(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let written = Tensor::read_safetensors(&out).expect("readable");
        assert_eq!(
            ids(tensor(&written, "input_ids")),
            ids(g.get(&case.name, "input_ids").expect("golden")),
            "{fixture} {}: input_ids",
            case.name
        );
        assert!(
            g.matches(&case.name, "pixel_values", tensor(&written, "pixel_values"))
                .expect("golden"),
            "{fixture} {}: pixel_values differ from HF's",
            case.name
        );

        // generate --json: HF's greedy tokens up to the first EOS.
        let mut args = with_images(vec![
            "generate".into(),
            "--model".into(),
            dir.clone(),
            "--prompt".into(),
            case.text.clone(),
        ]);
        // A short context keeps the start-up profile (its dummy prompt is this long) quick.
        args.extend([
            "--max-tokens".into(),
            "20".into(),
            "--max-model-len".into(),
            "1400".into(),
            "--json".into(),
        ]);
        let json: Value =
            serde_json::from_str(&mmreg(&args.iter().map(String::as_str).collect::<Vec<_>>()))
                .expect("one JSON object");
        let tokens: Vec<i64> = json["token_ids"]
            .as_array()
            .unwrap_or_else(|| panic!("no token_ids: {json}"))
            .iter()
            .map(|v| v.as_i64().expect("id"))
            .collect();
        let all = ids(g.get(&case.name, "generated").expect("golden"));
        let stops = eos(&repo().join(&dir));
        let expected = match all.iter().position(|t| stops.contains(t)) {
            Some(i) => all[..=i].to_vec(),
            None => all,
        };
        assert_eq!(tokens, expected, "{fixture} {}: generate --json", case.name);
        assert!(json["text"].is_string(), "{json}");
    }

    let parity = mmreg(&["parity", &dir]);
    assert!(
        parity.contains("checks agree with transformers"),
        "{parity}"
    );
}

#[test]
fn paligemma_cli_contracts() {
    contracts(
        "paligemma-tiny",
        "PaliGemmaForConditionalGeneration",
        "paligemma.rs",
    );
}

#[test]
fn gemma3_cli_contracts() {
    contracts("gemma3-tiny", "Gemma3ForConditionalGeneration", "gemma3.rs");
}

#[test]
fn idefics3_cli_contracts() {
    contracts(
        "idefics3-tiny",
        "Idefics3ForConditionalGeneration",
        "idefics3.rs",
    );
}

#[test]
fn smolvlm_cli_contracts() {
    contracts(
        "smolvlm-tiny",
        "SmolVLMForConditionalGeneration",
        "idefics3.rs",
    );
}

/// `generate --tensor-parallel-size 2` (two Gloo ranks on the CPU) prints HF's greedy tokens for the
/// tiny LLaVA-NeXT checkpoint, as one rank does; a size the heads do not split over is a clear error.
#[test]
fn generate_splits_over_tensor_parallel_ranks() {
    let fixture = "llava-next-tiny-real";
    let g = goldens(fixture);
    let dir = format!("fixtures/{fixture}");
    let case = g
        .meta
        .cases
        .iter()
        .find(|c| c.images.len() == 1)
        .expect("a case with one image");
    let image = format!("{dir}/{}", case.images[0]);
    let generate = |tp: &str| {
        run(&[
            "generate",
            "--model",
            &dir,
            "--prompt",
            &case.text,
            "--image",
            &image,
            "--max-tokens",
            "20",
            "--max-model-len",
            "4096",
            "--tensor-parallel-size",
            tp,
            "--json",
        ])
    };
    let output = generate("2");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    let tokens: Vec<i64> = json["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids: {json}"))
        .iter()
        .map(|v| v.as_i64().expect("id"))
        .collect();
    let all = ids(g.get(&case.name, "generated").expect("golden"));
    let stops = eos(&repo().join(&dir));
    let expected = match all.iter().position(|t| stops.contains(t)) {
        Some(i) => all[..=i].to_vec(),
        None => all,
    };
    assert_eq!(tokens, expected, "--tensor-parallel-size 2");

    // 4 heads over 3 ranks.
    let refused = generate("3");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("4 attention heads do not split over 3 tensor-parallel ranks"),
        "{stderr}"
    );
}
