//! mmreg-parity: checks a registered model against goldens that transformers made, the second half of
//! the parity harness (`scripts/parity.py ARCH` makes a tiny random checkpoint and its goldens; see
//! docs/parity.md).
//!
//! [`check`] loads the checkpoint in a fixture directory on the CPU in f32, finds its model in the
//! registry and compares, for every case of `parity.json`: the prompt's token ids, the mapped tensors
//! (bit for bit, under HF's names), the prefill logits at every prompt position (log-sum-exp, max and
//! argmax over the whole vocabulary, and a fixed set of columns, within a relative 1e-5), and the greedy
//! tokens; then the placeholder count of every size in the sweep. [`check_engine`] runs every case
//! through the engine in one batch. Both return a [`Report`]; a test asserts [`Report::assert_passed`],
//! `mmreg parity DIR` prints [`Report::table`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use mmreg_core::prepare::{prepare, PreparedInputs};
use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    ImageInput, LoadOptions, Modality, ModelContext, MultiModalData, MultiModalModel,
    ProcessorInputs, Prompt, Registry, Weights,
};
use mmreg_engine::generate::{embed_prompt, generate, prefill_logits_of};
use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};
use serde::Deserialize;
use tch::{Kind, Tensor};

/// The relative error allowed on f32 logits (of the largest golden logit magnitude).
pub const LOGIT_TOLERANCE: f64 = 1e-5;

/// `parity.json`: what `scripts/parity.py` ran.
#[derive(Debug, Clone, Deserialize)]
pub struct ParityMeta {
    pub arch: String,
    pub model_class: String,
    pub cases: Vec<Case>,
    /// The tensors HF's processor returned (saved as `{case}.{name}`).
    #[serde(default)]
    pub processor_outputs: Vec<String>,
    #[serde(default)]
    pub sweep: Vec<SweepPoint>,
    pub greedy_tokens: usize,
}

/// One prompt: the text given to HF's processor (mmreg gets the same), and its images.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub name: String,
    pub text: String,
    /// Paths relative to the fixture directory.
    #[serde(default)]
    pub images: Vec<String>,
}

/// The placeholder tokens HF's processor gave one image of `width × height`, or its error.
#[derive(Debug, Clone, Deserialize)]
pub struct SweepPoint {
    pub width: u32,
    pub height: u32,
    pub tokens: Option<usize>,
    pub error: Option<String>,
    /// Processor settings the point was made with (e.g. `{"do_pan_and_scan": true}`); such points are
    /// checked by the model's own tests, not here.
    #[serde(default)]
    pub processor_kwargs: Option<serde_json::Value>,
}

/// A fixture directory's goldens.
pub struct Goldens {
    pub dir: PathBuf,
    pub meta: ParityMeta,
    tensors: HashMap<String, Tensor>,
}

impl Goldens {
    /// Reads `parity.json` and `parity.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(dir.join("parity.json"))
            .with_context(|| format!("reading {}/parity.json", dir.display()))?;
        let meta: ParityMeta = serde_json::from_str(&json).context("parsing parity.json")?;
        let tensors = Tensor::read_safetensors(dir.join("parity.safetensors"))
            .with_context(|| format!("reading {}/parity.safetensors", dir.display()))?
            .into_iter()
            .collect();
        Ok(Self {
            dir: dir.to_owned(),
            meta,
            tensors,
        })
    }

    /// The golden `{case}.{key}`.
    pub fn get(&self, case: &str, key: &str) -> Result<&Tensor> {
        self.tensors
            .get(&format!("{case}.{key}"))
            .ok_or_else(|| anyhow!("parity.safetensors has no `{case}.{key}`"))
    }

    fn ids(&self, case: &str, key: &str) -> Result<Vec<i64>> {
        Ok(Vec::<i64>::try_from(
            self.get(case, key)?.flatten(0, -1).to_kind(Kind::Int64),
        )?)
    }

    /// The case's request as mmreg takes it: the same text, the images decoded from their files.
    pub fn inputs(&self, case: &Case) -> Result<ProcessorInputs> {
        let images = case
            .images
            .iter()
            .map(|p| ImageInput::open(self.dir.join(p)))
            .collect::<mmreg_core::Result<Vec<_>>>()?;
        Ok(ProcessorInputs {
            prompt: Prompt::Text(case.text.clone()),
            multimodal: MultiModalData {
                images,
                videos: Vec::new(),
            },
        })
    }
}

/// Writes `tokenizer.json` next to a committed `tokenizer.json.gz` when it is missing (tokenizers with
/// large vocabularies, such as Gemma's 33 MB one, are committed compressed).
pub fn unpack_tokenizer(dir: &Path) -> Result<()> {
    let (packed, plain) = (dir.join("tokenizer.json.gz"), dir.join("tokenizer.json"));
    if plain.exists() || !packed.exists() {
        return Ok(());
    }
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&packed)?)
        .read_to_end(&mut json)
        .with_context(|| format!("decompressing {}", packed.display()))?;
    // Written under another name first: tests running in parallel never read half a file.
    let partial = dir.join(format!("tokenizer.json.{}.partial", std::process::id()));
    std::fs::write(&partial, json)?;
    std::fs::rename(&partial, &plain)?;
    Ok(())
}

/// One comparison and its outcome.
#[derive(Debug, Clone)]
pub struct Check {
    /// The case (or `sweep`, `engine`).
    pub case: String,
    pub what: String,
    pub passed: bool,
    pub detail: String,
}

/// Every comparison of one run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub arch: String,
    pub checks: Vec<Check>,
}

impl Report {
    fn push(&mut self, case: &str, what: &str, passed: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            case: case.to_owned(),
            what: what.to_owned(),
            passed,
            detail: detail.into(),
        });
    }

    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.passed).collect()
    }

    /// One line per check: case, what, ok/FAIL, detail.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let status = if c.passed { "ok" } else { "FAIL" };
            let _ = writeln!(
                out,
                "{:<16} {:<22} {:<4} {}",
                c.case, c.what, status, c.detail
            );
        }
        out
    }

    /// Panics with the table when a check failed (or none ran).
    pub fn assert_passed(&self) {
        assert!(
            self.passed(),
            "{}: parity with transformers fails:\n{}",
            self.arch,
            self.table()
        );
    }
}

/// A fixture's checkpoint loaded on the CPU in f32, with its registry entry.
pub struct Loaded {
    pub ctx: ModelContext,
    pub entry: &'static ModelEntry,
    pub model: Box<dyn MultiModalModel>,
}

/// Loads the checkpoint in `dir` (f32, CPU) through the registry, as the engine would find it.
pub fn load(dir: &Path) -> Result<Loaded> {
    unpack_tokenizer(dir)?;
    let ctx = ModelContext::from_dir(dir)?;
    let entry = Registry::global().for_context(&ctx)?;
    let options = LoadOptions {
        device: tch::Device::Cpu,
        dtype: Kind::Float,
    };
    let weights = Weights::from_dir(dir)?;
    let model = entry.load(&ctx, &weights, &options)?;
    Ok(Loaded { ctx, entry, model })
}

/// Checks the model registered for the checkpoint in `dir` against its goldens: every case, then the
/// sweep.
pub fn check(dir: &Path) -> Result<Report> {
    let goldens = Goldens::load(dir)?;
    let loaded = load(dir)?;
    let mut report = Report {
        arch: goldens.meta.arch.clone(),
        checks: Vec::new(),
    };
    for case in &goldens.meta.cases {
        check_case(&loaded, &goldens, case, &mut report)?;
    }
    check_sweep(&loaded, &goldens, &mut report)?;
    Ok(report)
}

fn check_case(loaded: &Loaded, g: &Goldens, case: &Case, report: &mut Report) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let name = case.name.as_str();
    let prepared = match prepare(loaded.entry, &loaded.ctx, g.inputs(case)?, usize::MAX) {
        Ok(p) => p,
        Err(e) => {
            report.push(name, "prepare", false, e.to_string());
            return Ok(());
        }
    };
    let ids: Vec<i64> = prepared
        .processed
        .token_ids
        .iter()
        .map(|&t| t as i64)
        .collect();
    let expected = g.ids(name, "input_ids")?;
    report.push(
        name,
        "input_ids",
        ids == expected,
        format!("{} tokens (HF {})", ids.len(), expected.len()),
    );
    if ids != expected {
        return Ok(());
    }
    check_mapped(&prepared, g, name, report)?;

    let processed = prepared.processed.clone();
    let embeds = embed_prompt(loaded.entry, &*loaded.model, prepared.shallow_clone())?;
    let logits = prefill_logits_of(&*loaded.model, &embeds, &processed)?.to_kind(Kind::Float);
    check_logits(&logits, g, name, report)?;

    let params = SamplingParams {
        max_tokens: g.meta.greedy_tokens,
        ..SamplingParams::default()
    };
    let generated = generate(loaded.entry, &*loaded.model, prepared, &params)?;
    let generated: Vec<i64> = generated.token_ids.iter().map(|&t| t as i64).collect();
    let expected = g.ids(name, "generated")?;
    let agree = generated
        .iter()
        .zip(&expected)
        .take_while(|(a, b)| a == b)
        .count();
    report.push(
        name,
        "greedy tokens",
        generated == expected,
        format!("{agree} of {} agree", expected.len()),
    );
    Ok(())
}

/// The mapped tensors against HF's processor outputs of the same name, bit for bit. HF outputs the
/// model does not take (`attention_mask`, `token_type_ids`, …) are not compared.
fn check_mapped(
    prepared: &PreparedInputs,
    g: &Goldens,
    case: &str,
    report: &mut Report,
) -> Result<()> {
    for (_, tensors) in &prepared.mapped {
        for (name, ours) in tensors.iter() {
            if !g.meta.processor_outputs.iter().any(|n| n == name) {
                continue;
            }
            let theirs = g.get(case, name)?;
            let same = ours.size() == theirs.size()
                && ours.kind() == theirs.kind()
                && ours.equal(theirs);
            let detail = if same {
                format!("{:?} bit-identical", ours.size())
            } else if ours.size() != theirs.size() || ours.kind() != theirs.kind() {
                format!(
                    "ours {:?} {:?}, HF {:?} {:?}",
                    ours.size(),
                    ours.kind(),
                    theirs.size(),
                    theirs.kind()
                )
            } else {
                let diff = (ours - theirs).abs();
                format!(
                    "{} values differ, by up to {:e}",
                    diff.gt(0.0).sum(Kind::Int64).int64_value(&[]),
                    diff.max().double_value(&[])
                )
            };
            report.push(case, name, same, detail);
        }
    }
    Ok(())
}

/// Logits `[T, vocab]` at every prompt position against the golden log-sum-exp, max, argmax and columns.
fn check_logits(logits: &Tensor, g: &Goldens, case: &str, report: &mut Report) -> Result<()> {
    let columns = g.get(case, "columns")?;
    let golden_columns = g.get(case, "column_logits")?;
    let scale = golden_columns
        .abs()
        .max()
        .double_value(&[])
        .max(g.get(case, "max")?.abs().max().double_value(&[]));
    if logits.size()[0] != golden_columns.size()[0] {
        report.push(
            case,
            "logits",
            false,
            format!(
                "{} positions, HF {}",
                logits.size()[0],
                golden_columns.size()[0]
            ),
        );
        return Ok(());
    }
    let relative = |ours: &Tensor, theirs: &Tensor| -> f64 {
        (ours - theirs).abs().max().double_value(&[]) / scale
    };
    let errors = [
        relative(&logits.index_select(1, columns), golden_columns),
        relative(&logits.logsumexp([-1], false), g.get(case, "lse")?),
        relative(&logits.amax([-1], false), g.get(case, "max")?),
    ];
    let worst = errors.iter().copied().fold(0.0, f64::max);
    report.push(
        case,
        "prefill logits",
        worst <= LOGIT_TOLERANCE,
        format!(
            "relative error {worst:.1e} at {} positions (columns {:.1e}, lse {:.1e}, max {:.1e})",
            logits.size()[0],
            errors[0],
            errors[1],
            errors[2]
        ),
    );
    let ours = Vec::<i64>::try_from(logits.argmax(-1, false))?;
    let theirs = g.ids(case, "argmax")?;
    let differ: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
    report.push(
        case,
        "argmax",
        differ.is_empty(),
        if differ.is_empty() {
            format!("equal at all {} positions", ours.len())
        } else {
            format!("differs at positions {differ:?}")
        },
    );
    Ok(())
}

/// The placeholder count of one image of each swept size, or an error where HF's processor refused.
fn check_sweep(loaded: &Loaded, g: &Goldens, report: &mut Report) -> Result<()> {
    let (mut agree, mut differ) = (0, Vec::new());
    for point in g.meta.sweep.iter().filter(|p| p.processor_kwargs.is_none()) {
        let image = image::DynamicImage::new_rgb8(point.width, point.height);
        let data = MultiModalData {
            images: vec![ImageInput::new("sweep", image)],
            videos: Vec::new(),
        };
        let ours = loaded
            .entry
            .item_tokens(&loaded.ctx, Modality::Image, &data)
            .map(|counts| counts[0]);
        match (&ours, point.tokens, &point.error) {
            (Ok(n), Some(m), _) if *n == m => agree += 1,
            (Err(_), None, Some(_)) => agree += 1,
            _ => differ.push(format!(
                "{}x{}: ours {:?}, HF {:?}",
                point.width,
                point.height,
                ours.as_ref().map_err(|e| e.to_string()),
                point.tokens.ok_or(point.error.clone())
            )),
        }
    }
    if agree + differ.len() > 0 {
        report.push(
            "sweep",
            "placeholder counts",
            differ.is_empty(),
            if differ.is_empty() {
                format!("{agree} sizes agree")
            } else {
                differ.join("; ")
            },
        );
    }
    Ok(())
}

/// Every case through the engine in one batch (in order, then reversed), with `options`: the greedy
/// tokens must equal HF's.
pub fn check_engine(dir: &Path, options: EngineOptions) -> Result<Report> {
    let goldens = Goldens::load(dir)?;
    unpack_tokenizer(dir)?;
    let engine = Engine::new(dir, options)?;
    let cases: Vec<&Case> = goldens
        .meta
        .cases
        .iter()
        .chain(goldens.meta.cases.iter().rev())
        .collect();
    let requests = cases
        .iter()
        .map(|case| Request {
            prompt: Prompt::Text(case.text.clone()),
            images: case
                .images
                .iter()
                .map(|p| ImageSource::Path(dir.join(p)))
                .collect(),
            videos: Vec::new(),
            params: SamplingParams {
                max_tokens: goldens.meta.greedy_tokens,
                ..SamplingParams::default()
            },
        })
        .collect();
    let mut report = Report {
        arch: goldens.meta.arch.clone(),
        checks: Vec::new(),
    };
    for (case, result) in cases.iter().zip(engine.generate(requests)) {
        let expected = goldens.ids(&case.name, "generated")?;
        match result {
            Ok(done) => {
                let tokens: Vec<i64> = done.token_ids.iter().map(|&t| t as i64).collect();
                report.push(
                    &case.name,
                    "engine greedy tokens",
                    tokens == expected,
                    format!("{} tokens", tokens.len()),
                );
            }
            Err(e) => report.push(&case.name, "engine greedy tokens", false, e.to_string()),
        }
    }
    Ok(report)
}
