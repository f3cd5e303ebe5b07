//! The command line's contracts for Qwen2-VL and Qwen2.5-VL: `models` lists both with their
//! registrations, `check` passes on their default configs, `preprocess --out` writes HF's tensors for
//! images and videos, and `generate` (one prompt with `--json`, or `--requests` with videos) gives
//! HF's greedy tokens, stopping where HF's `generate` would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
        "mmreg {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

const TINY: &str = "fixtures/qwen2-vl-tiny";
const EOS: i64 = 151645;

/// golden.json of the tiny Qwen2-VL checkpoint.
fn meta() -> Value {
    let text = std::fs::read_to_string(repo().join(TINY).join("golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("json")
}

fn golden() -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(repo().join(TINY).join("golden.safetensors")).expect("golden")
}

fn tensor<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

fn ids(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1)).expect("i64")
}

/// A case's prompt, image paths and video frame paths (each video comma-joined, as `--video` takes
/// them), relative to the repository.
fn case(meta: &Value, name: &str) -> (String, Vec<String>, Vec<Vec<String>>) {
    let case = &meta["cases"][name];
    let file = |f: &Value| format!("{TINY}/images/{}", f.as_str().expect("file"));
    let images = case["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(file)
        .collect();
    let videos = case["videos"]
        .as_object()
        .expect("videos")
        .values()
        .map(|frames| {
            frames
                .as_array()
                .expect("frames")
                .iter()
                .map(file)
                .collect()
        })
        .collect();
    (
        case["prompt"].as_str().expect("prompt").into(),
        images,
        videos,
    )
}

/// HF's 20 greedy tokens of a case (made without EOS), cut after the first of `eos` as generation
/// that stops on them gives.
fn hf_tokens(golden: &[(String, Tensor)], name: &str, eos: &[i64]) -> Vec<i64> {
    let all = ids(tensor(golden, &format!("{name}.generated")));
    match all.iter().position(|t| eos.contains(t)) {
        Some(i) => all[..=i].to_vec(),
        None => all,
    }
}

fn generate_json(model: &str, prompt: &str, images: &[String], extra: &[&str]) -> Value {
    let mut args = vec!["generate", "--model", model, "--prompt", prompt];
    for image in images {
        args.extend(["--image", image.as_str()]);
    }
    args.extend(["--max-tokens", "20", "--json"]);
    args.extend(extra);
    serde_json::from_str(&mmreg(&args)).expect("one JSON object")
}

fn token_ids(json: &Value) -> Vec<i64> {
    json["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids: {json}"))
        .iter()
        .map(|v| v.as_i64().expect("an id"))
        .collect()
}

#[test]
fn models_lists_both_qwen_architectures_with_their_registrations() {
    let stdout = mmreg(&["models"]);
    for (architecture, path, file) in [
        (
            "Qwen2VLForConditionalGeneration",
            "mmreg_models::qwen2_vl::Qwen2Vl",
            "qwen2_vl.rs",
        ),
        (
            "Qwen2_5_VLForConditionalGeneration",
            "mmreg_models::qwen2_5_vl::Qwen25Vl",
            "qwen2_5_vl.rs",
        ),
    ] {
        let header = format!("{architecture}  ({path})  modalities: image, video");
        let block: Vec<&str> = stdout
            .lines()
            .skip_while(|l| *l != header)
            .skip(1)
            .take_while(|l| l.starts_with("    "))
            .collect();
        assert!(!block.is_empty(), "no `{header}`: {stdout}");
        for (hook, function) in [
            ("model", "LoadModel::load"),
            ("input mapper (image)", "map_images"),
            ("max tokens (image)", "default (costliest item)"),
            ("input mapper (video)", "map_videos"),
            ("max tokens (video)", "default (costliest item)"),
            ("dummy data", "default (costliest items, filler)"),
            ("input processor", "input_processor"),
        ] {
            let line = block
                .iter()
                .find(|l| l.trim_start().starts_with(hook))
                .unwrap_or_else(|| panic!("{architecture}: no {hook}: {block:?}"));
            let fields: Vec<&str> = line[4 + hook.len()..].trim().split("  ").collect();
            assert_eq!(fields.first(), Some(&function), "{architecture}: {line}");
            assert!(
                line.contains(&format!("mmreg-models/src/{file}:")),
                "{architecture}: {line}"
            );
        }
        assert_eq!(block.len(), 7, "{architecture}: {block:?}");
    }
    assert!(!stdout.contains("problem:"), "{stdout}");
}

/// Without a checkpoint the configs' defaults apply: HF's max_pixels 1003520 = 1280 merged tokens.
#[test]
fn check_passes_for_both_qwen_architectures_on_default_configs() {
    for (architecture, path) in [
        (
            "Qwen2VLForConditionalGeneration",
            "mmreg_models::qwen2_vl::Qwen2Vl",
        ),
        (
            "Qwen2_5_VLForConditionalGeneration",
            "mmreg_models::qwen2_5_vl::Qwen25Vl",
        ),
    ] {
        let stdout = mmreg(&["check", architecture]);
        assert!(
            stdout.starts_with(&format!("ok  {path}  dummy prompt: 4096 tokens\n")),
            "{stdout}"
        );
        for line in [
            "    image: max 1280 tokens per item, dummy items [1280], mapped [(\"image_grid_thw\", [1, 3]), (\"pixel_values\", [5120, 1176])]",
            "    video: max 1280 tokens per item, dummy items [1280], mapped [(\"pixel_values_videos\", [5120, 1176]), (\"video_grid_thw\", [1, 3])]",
        ] {
            assert!(stdout.lines().any(|l| l == line), "{architecture}: {stdout}");
        }
    }
}

/// `preprocess --out` writes exactly HF's processor outputs for every golden case: the expanded ids,
/// and the pixel values and grids of the images and of the videos (given as `--video f0,f1,...`).
#[test]
fn preprocess_writes_hfs_tensors_for_images_and_videos() {
    let (meta, golden) = (meta(), golden());
    let dir = tempfile::tempdir().expect("temp dir");
    for name in [
        "one_image",
        "two_images",
        "video",
        "image_and_video",
        "text_only",
    ] {
        let (prompt, images, videos) = case(&meta, name);
        let out = dir.path().join(format!("{name}.safetensors"));
        let out = out.to_str().expect("path");
        let videos: Vec<String> = videos.iter().map(|frames| frames.join(",")).collect();
        let mut args = vec!["preprocess", "--model", TINY, "--prompt", &prompt];
        for image in &images {
            args.extend(["--image", image.as_str()]);
        }
        for video in &videos {
            args.extend(["--video", video.as_str()]);
        }
        args.extend(["--out", out]);
        let stdout = mmreg(&args);
        let written = Tensor::read_safetensors(out).expect("readable");
        let mut expected = vec!["input_ids"];
        if !images.is_empty() {
            expected.extend(["pixel_values", "image_grid_thw"]);
        }
        if !videos.is_empty() {
            expected.extend(["pixel_values_videos", "video_grid_thw"]);
        }
        let mut names: Vec<&str> = written.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        expected.sort_unstable();
        assert_eq!(names, expected, "{name}");
        for key in expected {
            let (ours, hf) = (
                tensor(&written, key),
                tensor(&golden, &format!("{name}.{key}")),
            );
            assert_eq!(ours.kind(), hf.kind(), "{name}: {key}");
            assert!(ours.equal(hf), "{name}: {key} differs from HF's");
            assert!(
                stdout.contains(&format!("{key}: {:?} {:?}", hf.kind(), hf.size())),
                "{name}: {stdout}"
            );
        }
    }
}

/// `generate --json` with the default stop tokens (config.json's eos, `<|im_end|>`): HF's greedy
/// tokens up to EOS (the golden's 20 have none), and their text.
#[test]
fn generate_json_gives_hfs_greedy_tokens() {
    let (meta, golden) = (meta(), golden());
    let (prompt, images, _) = case(&meta, "one_image");
    let json = generate_json(TINY, &prompt, &images, &[]);
    let expected = hf_tokens(&golden, "one_image", &[EOS]);
    assert_eq!(expected.len(), 20, "the golden has no EOS");
    assert_eq!(token_ids(&json), expected);
    let text = json["text"].as_str().expect("text");
    assert!(text.starts_with(" Party"), "{json}");
}

/// The prompt written as the chat template writes it without a system turn (the brief's form) runs
/// too: text and 20 tokens, the same alone as inside a `--requests` batch.
#[test]
fn generate_json_on_a_user_turn_prompt() {
    let prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n";
    let image = format!("{TINY}/images/a_w300_h200.png");
    let alone = generate_json(
        TINY,
        prompt,
        std::slice::from_ref(&image),
        &["--ignore-eos"],
    );
    let tokens = token_ids(&alone);
    assert_eq!(tokens.len(), 20, "{alone}");
    assert!(alone["text"].as_str().is_some_and(|t| !t.is_empty()));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("requests.jsonl");
    let line = serde_json::json!({ "prompt": prompt, "images": [image], "max_tokens": 20, "ignore_eos": true });
    let other =
        serde_json::json!({ "prompt": "<|im_start|>user\nHi<|im_end|>\n", "max_tokens": 3 });
    std::fs::write(&file, format!("{other}\n{line}\n{other}\n")).expect("write");
    let stdout = mmreg(&[
        "generate",
        "--model",
        TINY,
        "--requests",
        file.to_str().expect("path"),
    ]);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(token_ids(&lines[1]), tokens);
    assert_eq!(lines[1]["text"], alone["text"]);
}

/// `--requests` lines with `"videos": [[frames...]]`, images, both, and a video whose frames differ in
/// size: HF's tokens for each good line and the bad line's error, in input order.
#[test]
fn generate_requests_with_videos() {
    let (meta, golden) = (meta(), golden());
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("requests.jsonl");
    let line = |name: &str| {
        let (prompt, images, videos) = case(&meta, name);
        serde_json::json!({ "prompt": prompt, "images": images, "videos": videos, "max_tokens": 20 })
    };
    let (video_prompt, _, videos) = case(&meta, "video");
    let mut mixed_sizes = videos[0].clone();
    mixed_sizes[2] = format!("{TINY}/images/b_w160_h480.png");
    let bad = serde_json::json!({ "prompt": video_prompt, "videos": [mixed_sizes] });
    let cases = ["video", "one_image", "image_and_video", "text_only"];
    let mut text: Vec<String> = cases.iter().map(|c| line(c).to_string()).collect();
    text.insert(2, bad.to_string());
    std::fs::write(&file, text.join("\n")).expect("write");
    let stdout = mmreg(&[
        "generate",
        "--model",
        TINY,
        "--requests",
        file.to_str().expect("path"),
    ]);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert_eq!(
        lines[2],
        serde_json::json!({ "error": "video #0: every frame of a video must have one size: 112x84 and 160x480" })
    );
    let good = [0, 1, 3, 4];
    for (case, i) in cases.iter().zip(good) {
        assert_eq!(
            token_ids(&lines[i]),
            hf_tokens(&golden, case, &[EOS]),
            "{case}"
        );
    }
}

/// HF's `generate` stops on generation_config.json's `eos_token_id`, an id or a list (Qwen2.5-VL-7B's
/// is `[151645, 151643]`), and without that file on config.json's, which may be a list too.
#[test]
fn generate_stops_on_every_eos_token_as_hf_does() {
    let (meta, golden) = (meta(), golden());
    let (prompt, images, _) = case(&meta, "one_image");
    let all = hf_tokens(&golden, "one_image", &[]);
    // The third greedy token, made an EOS token.
    let third = all[2];
    let copy = || {
        let dir = tempfile::tempdir().expect("temp dir");
        for entry in std::fs::read_dir(repo().join(TINY)).expect("fixture") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                std::fs::copy(&path, dir.path().join(path.file_name().expect("name")))
                    .expect("copy");
            }
        }
        dir
    };
    let images: Vec<String> = images
        .iter()
        .map(|i| repo().join(i).to_str().expect("path").to_owned())
        .collect();
    let edit = |dir: &Path, file: &str, edit: &dyn Fn(&mut Value)| {
        let path = dir.join(file);
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect(file)).expect("json");
        edit(&mut json);
        std::fs::write(&path, json.to_string()).expect("write");
    };

    let dir = copy();
    edit(dir.path(), "generation_config.json", &|g| {
        g["eos_token_id"] = serde_json::json!([EOS, third]);
    });
    let model = dir.path().to_str().expect("path");
    let json = generate_json(model, &prompt, &images, &[]);
    assert_eq!(token_ids(&json), all[..3], "generation_config.json's list");
    let ignored = generate_json(model, &prompt, &images, &["--ignore-eos"]);
    assert_eq!(token_ids(&ignored), all, "--ignore-eos");

    let dir = copy();
    std::fs::remove_file(dir.path().join("generation_config.json")).expect("remove");
    edit(dir.path(), "config.json", &|c| {
        c["text_config"]["eos_token_id"] = serde_json::json!([third, EOS]);
    });
    let json = generate_json(dir.path().to_str().expect("path"), &prompt, &images, &[]);
    assert_eq!(token_ids(&json), all[..3], "config.json's list");
}

/// A bad request on the command line is an error on stderr that says what is wrong.
#[test]
fn an_image_placeholder_without_an_image_is_a_clear_error() {
    let output = run(&[
        "generate",
        "--model",
        TINY,
        "--prompt",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.ends_with(
            "error: the prompt has 1 `<|image_pad|>` placeholder(s) but 0 image item(s) were given\n"
        ),
        "{stderr}"
    );
}
