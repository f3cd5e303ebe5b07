//! The command line's contracts: `models`, `check`, `preprocess --out`, `generate --json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::Tensor;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn mmreg(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_mmreg"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "mmreg {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `mmreg preprocess` and reads back what it wrote.
fn preprocess(model: &str, prompt: &str, image: &str) -> Vec<(String, Tensor)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("inputs.safetensors");
    let out = out.to_str().expect("path");
    mmreg(&[
        "preprocess",
        "--model",
        model,
        "--prompt",
        prompt,
        "--image",
        image,
        "--out",
        out,
    ]);
    Tensor::read_safetensors(out).expect("readable")
}

fn tensor<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

const PROMPT: &str = "USER: <image>\nWhat is shown in this image? ASSISTANT:";

#[test]
fn models_lists_llava_with_source_locations() {
    let stdout = String::from_utf8(mmreg(&["models"]).stdout).expect("utf-8");
    let header = "LlavaForConditionalGeneration  (mmreg_models::llava::Llava)  modalities: image";
    // The models are listed by name; LLaVA's block is its header and the indented lines after it.
    let block: Vec<&str> = stdout
        .lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .collect();
    assert!(!block.is_empty(), "no `{header}`: {stdout}");
    for hook in [
        "model",
        "input mapper (image)",
        "max tokens (image)",
        "dummy data",
        "input processor",
    ] {
        let line = block
            .iter()
            .find(|l| l.trim_start().starts_with(hook))
            .unwrap_or_else(|| panic!("{hook}: {stdout}"));
        assert!(line.contains("mmreg-models/src/llava.rs:"), "{line}");
    }
    assert!(!stdout.contains("problem:"), "{stdout}");
}

#[test]
fn inspect_marks_the_parameters_that_stay_on_the_host() {
    let output = mmreg(&["inspect", "LlavaNextForConditionalGeneration"]);
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    assert!(
        stdout.contains("forward parameters (image): image_sizes (host), pixel_values\n"),
        "{stdout}"
    );
}

#[test]
fn check_passes_on_the_tiny_checkpoint() {
    let stdout = String::from_utf8(
        mmreg(&[
            "check",
            "LlavaForConditionalGeneration",
            "--model-dir",
            "fixtures/llava-tiny-real",
            "--seq-len",
            "600",
        ])
        .stdout,
    )
    .expect("utf-8");
    assert!(
        stdout.contains("ok  mmreg_models::llava::Llava  dummy prompt: 600 tokens"),
        "{stdout}"
    );
    assert!(
        stdout.contains("image: max 576 tokens per item, dummy items [576]"),
        "{stdout}"
    );
}

#[test]
fn preprocess_writes_what_the_model_is_fed() {
    let image = "fixtures/llava-tiny-real/images/a_300x200.png";
    let tensors = preprocess("fixtures/llava-tiny-real", PROMPT, image);
    let get = |name: &str| tensor(&tensors, name);
    let ids = get("input_ids");
    assert_eq!(ids.kind(), tch::Kind::Int64);
    assert_eq!(ids.eq(32000).sum(tch::Kind::Int64).int64_value(&[]), 576);
    let pixels = get("pixel_values");
    assert_eq!(
        (pixels.kind(), pixels.size()),
        (tch::Kind::Float, vec![1, 3, 336, 336])
    );
    let golden =
        Tensor::read_safetensors(repo().join("fixtures/llava-tiny-real/golden.safetensors"))
            .expect("golden");
    let golden_ids = &golden
        .iter()
        .find(|(n, _)| n == "one_image.input_ids")
        .expect("ids")
        .1;
    assert!(ids.equal(golden_ids));
}

#[test]
fn generate_json_prints_text_and_generated_token_ids() {
    let image = "fixtures/llava-tiny-real/images/a_300x200.png";
    let output = mmreg(&[
        "generate",
        "--model",
        "fixtures/llava-tiny-real",
        "--image",
        image,
        "--prompt",
        PROMPT,
        "--max-tokens",
        "5",
        "--json",
        "--ignore-eos",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    let ids: Vec<u64> = json["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert_eq!(
        ids,
        vec![23181, 30600, 17302, 17816, 27764],
        "HF's first greedy tokens"
    );
    assert!(json["text"].as_str().is_some_and(|t| !t.is_empty()));
}

#[test]
fn bad_image_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_mmreg"))
        .args([
            "generate",
            "--model",
            "fixtures/llava-tiny-real",
            "--image",
            bad.to_str().expect("path"),
            "--prompt",
            PROMPT,
        ])
        .current_dir(repo())
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("broken.png"),
        "{stderr}"
    );
}

#[test]
fn preprocess_on_llava_next_writes_the_counted_placeholders_and_image_sizes() {
    let image = "fixtures/llava-next-tiny-real/images/portrait_500x316.png";
    let prompt = "[INST] <image>\nWhat is shown in this image? [/INST]";
    let tensors = preprocess("fixtures/llava-next-tiny-real", prompt, image);
    let get = |name: &str| tensor(&tensors, name);
    // 500x316 (height x width): best canvas 672x336, unpadded grid 38x24, 576 + 38 * 25 = 1526 tokens.
    assert_eq!(
        get("input_ids")
            .eq(32000)
            .sum(tch::Kind::Int64)
            .int64_value(&[]),
        1526
    );
    assert_eq!(
        Vec::<i64>::try_from(get("image_sizes").flatten(0, -1)).expect("i64"),
        vec![500, 316]
    );
    assert_eq!(get("pixel_values").size(), vec![1, 3, 3, 336, 336]);
}

/// The demo model is inside the binary: a copy of it, run from a directory with no checkout and a fresh
/// cache, describes a sample image as the one in the source tree does (HF's caption).
#[test]
fn the_demo_model_travels_inside_the_binary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = dir.path().join("mmreg");
    std::fs::copy(env!("CARGO_BIN_EXE_mmreg"), &binary).expect("copy the binary");
    let samples = repo().join("assets/shapes-llava/samples");
    let captions: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(samples.join("captions.json")).expect("captions"),
    )
    .expect("json");
    let (name, caption) = captions
        .as_object()
        .and_then(|c| c.iter().next())
        .expect("a sample");
    let image = samples.join(name);
    let output = Command::new(&binary)
        .args(["generate", "--image", image.to_str().expect("path")])
        .args([
            "--prompt",
            "<image> describe:",
            "--max-tokens",
            "24",
            "--json",
        ])
        .current_dir(dir.path())
        .env("MMREG_CACHE", dir.path().join("cache"))
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(json["text"], *caption, "{json}");
    assert!(dir
        .path()
        .join("cache")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some()));
}

#[test]
fn requests_report_the_prompt_tokens_served_from_the_prefix_cache() {
    let dir = tempfile::tempdir().expect("temp dir");
    let requests = dir.path().join("requests.jsonl");
    let line = serde_json::json!({
        "prompt": PROMPT,
        "images": ["fixtures/llava-tiny-real/images/a_300x200.png"],
        "max_tokens": 3,
    });
    std::fs::write(&requests, format!("{line}\n{line}\n")).expect("requests");
    let requests = requests.to_str().expect("utf-8 path");
    let run = |extra: &[&str]| -> Vec<serde_json::Value> {
        // One sequence at a time: the second request starts after the first has finished.
        let mut args = vec![
            "generate",
            "--model",
            "fixtures/llava-tiny-real",
            "--requests",
            requests,
            "--max-num-seqs",
            "1",
        ];
        args.extend(extra);
        let output = mmreg(&args);
        String::from_utf8(output.stdout)
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let cached = run(&[]);
    assert_eq!(cached[0]["prompt_tokens"], 595);
    // Whichever the workers hand over first runs cold; the other reuses every full 16-token block before
    // the last prompt token.
    let mut counts: Vec<u64> = cached
        .iter()
        .map(|c| c["cached_tokens"].as_u64().expect("cached_tokens"))
        .collect();
    counts.sort();
    assert_eq!(counts, [0, (595 - 1) / 16 * 16]);
    assert_eq!(cached[0]["token_ids"], cached[1]["token_ids"]);
    let plain = run(&["--no-prefix-caching"]);
    assert_eq!(plain[1]["cached_tokens"], 0);
    assert_eq!(plain[1]["token_ids"], cached[1]["token_ids"]);
}

/// `bench` prints one JSON object: the KV cache's blocks, prefill and first-token times, and decode
/// throughput timed from the moment the last request had its first token (so that steps still
/// prefilling other prompts are not counted as decode), and its steps split into issuing and waiting.
#[test]
fn bench_times_decode_after_every_prompt_is_prefilled() {
    let output = mmreg(&[
        "bench",
        "--model",
        "fixtures/llava-tiny-real",
        "--image",
        "fixtures/llava-tiny-real/images/a_300x200.png",
        "--prompt",
        "USER: <image>\nWhat is shown? ASSISTANT:",
        "--batch",
        "1,3",
        "--max-tokens",
        "12",
        "--repeat",
        "2",
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "--max-num-batched-tokens",
        "600",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a line")).expect("one JSON object");
    let number = |k: &str| json[k].as_f64().unwrap_or_else(|| panic!("no {k}: {json}"));
    assert!(number("kv_blocks") > 0.0);
    assert_eq!(number("sliding_blocks"), 0.0);
    // What was measured: the step budget given, and a batch's requests each with its own image.
    assert_eq!(number("max_num_batched_tokens"), 600.0);
    assert_eq!(json["distinct_images"], true, "{json}");
    for b in [1, 3] {
        assert!(number(&format!("decode_tok_per_s_bs{b}")) > 0.0);
        // Timed while all `b` decode, and with the tail of a shrinking batch: one request has no tail.
        let with_tail = number(&format!("decode_with_tail_tok_per_s_bs{b}"));
        assert!(with_tail > 0.0, "{json}");
        if b == 1 {
            assert_eq!(with_tail, number("decode_tok_per_s_bs1"), "{json}");
        }
        assert!(number(&format!("ttft_last_bs{b}_ms")) >= number(&format!("ttft_bs{b}_ms")));
        // The decode steps split into the host's issuing and the wait for the tokens.
        assert!(number(&format!("decode_step_ms_bs{b}")) > 0.0, "{json}");
        assert!(number(&format!("decode_issue_ms_bs{b}")) > 0.0, "{json}");
        assert!(number(&format!("decode_wait_ms_bs{b}")) >= 0.0, "{json}");
        // The prefill's mean, and each pass it is the mean of, with their median.
        let passes: Vec<f64> = json[format!("prefill_bs{b}_passes_ms")]
            .as_array()
            .unwrap_or_else(|| panic!("no passes: {json}"))
            .iter()
            .map(|p| p.as_f64().expect("a number"))
            .collect();
        assert_eq!(passes.len(), 2, "{json}");
        let mean = (passes[0] + passes[1]) / 2.0;
        assert!(
            (number(&format!("prefill_bs{b}_ms")) - mean).abs() < 1e-9,
            "{json}"
        );
        assert!(
            (number(&format!("prefill_bs{b}_median_ms")) - mean).abs() < 1e-9,
            "{json}"
        );
        // The last pass step by step: [prompt tokens, decodes, issued ms, ms], each issued before
        // it landed, its prompt tokens summing to the batch's.
        let detail = json[format!("prefill_step_detail_bs{b}")]
            .as_array()
            .unwrap_or_else(|| panic!("no detail: {json}"))
            .clone();
        let field = |step: &serde_json::Value, i: usize| step[i].as_f64().expect("a number");
        let tokens: f64 = detail.iter().map(|s| field(s, 0)).sum();
        assert_eq!(tokens, number("prompt_tokens") * b as f64, "{json}");
        assert!(detail.iter().all(|s| field(s, 2) <= field(s, 3)), "{json}");
        assert!(number(&format!("prefill_issue_bs{b}_ms")) > 0.0, "{json}");
    }
    // Three 595-token prompts in steps of at most 600 tokens: the last one starts later.
    assert!(number("prefill_steps_bs3") >= 3.0, "{json}");
    assert!(number("ttft_last_bs3_ms") > number("ttft_bs3_ms"), "{json}");
}
