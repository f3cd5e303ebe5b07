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
    DummyRequest, ImageInput, LoadOptions, Modality, ModalityCounts, ModelContext, MultiModalData,
    MultiModalModel, ProcessorInputs, Prompt, Registry, Weights,
};
use mmreg_engine::generate::{embed_prompt, generate, prefill_logits_of};
use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};
use serde::Deserialize;
use sha2::Digest as _;
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
    /// Keyword arguments HF's processor was called with. `add_special_tokens` is the tokenizer's (the
    /// model's input processor must reach the same ids on its own); any other is an image-processor
    /// setting, which mmreg reads from the checkpoint, so such a case runs on a copy of the checkpoint
    /// whose processor config has them.
    #[serde(default)]
    pub processor_kwargs: serde_json::Map<String, serde_json::Value>,
    /// Processor outputs too large to store, as shape, dtype and the SHA-256 of their little-endian
    /// bytes.
    #[serde(default)]
    pub processor_output_digests: HashMap<String, Digest>,
}

/// A tensor known by its shape and the SHA-256 of its little-endian, C-order bytes.
#[derive(Debug, Clone, Deserialize)]
pub struct Digest {
    pub shape: Vec<i64>,
    pub dtype: String,
    pub sha256_le: String,
}

/// The image-processor settings among a case's (or sweep point's) processor kwargs.
fn image_kwargs(
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    kwargs
        .iter()
        .filter(|(k, _)| k.as_str() != "add_special_tokens")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The placeholder tokens HF's processor gave one image of `width × height`, or its error.
#[derive(Debug, Clone, Deserialize)]
pub struct SweepPoint {
    pub width: u32,
    pub height: u32,
    pub tokens: Option<usize>,
    pub error: Option<String>,
    /// Processor settings the point was made with (e.g. `{"do_pan_and_scan": true}`).
    #[serde(default)]
    pub processor_kwargs: serde_json::Map<String, serde_json::Value>,
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

    /// The engine request of `case` (its prompt and images, from the checkpoint `dir`), greedy for as
    /// many tokens as HF generated.
    pub fn request(&self, dir: &Path, case: &Case) -> Request {
        Request {
            prompt: Prompt::Text(case.text.clone()),
            images: case
                .images
                .iter()
                .map(|p| ImageSource::Path(dir.join(p)))
                .collect(),
            videos: Vec::new(),
            params: SamplingParams {
                max_tokens: self.meta.greedy_tokens,
                ..SamplingParams::default()
            },
        }
    }

    /// A golden tensor of `case` as a flat list of ids (token ids, greedy tokens).
    pub fn ids(&self, case: &str, key: &str) -> Result<Vec<i64>> {
        Ok(Vec::<i64>::try_from(
            self.get(case, key)?.flatten(0, -1).to_kind(Kind::Int64),
        )?)
    }

    /// Whether `ours` equals HF's processor output `name` of `case` bit for bit: the stored tensor, or
    /// its digest (HF's leading batch axis of 1 aside).
    pub fn matches(&self, case: &str, name: &str, ours: &Tensor) -> Result<bool> {
        if let Some(digest) = case_digest(self, case, name) {
            return Ok(drop_batch_of_one(&ours.size(), &digest.shape)
                && sha256_le(ours)? == digest.sha256_le);
        }
        let theirs = self.get(case, name)?;
        let theirs = if ours.dim() < theirs.dim() && drop_batch_of_one(&ours.size(), &theirs.size())
        {
            theirs.squeeze_dim(0)
        } else {
            theirs.shallow_clone()
        };
        Ok(ours.size() == theirs.size() && ours.kind() == theirs.kind() && ours.equal(&theirs))
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
    // Written under a name of its own first: tests running in parallel never read half a file.
    let mut partial = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut partial, &json)?;
    partial.persist(&plain)?;
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
        tensor_parallel: None,
        shard_vision_tower: false,
    };
    let weights = Weights::from_dir(dir)?;
    let model = entry.load(&ctx, &weights, &options)?;
    Ok(Loaded { ctx, entry, model })
}

/// A checkpoint to run some cases on: the fixture itself, or a copy whose image-processor config has a
/// case's settings (the other files linked, not copied).
pub struct Variant {
    pub dir: PathBuf,
    /// The settings, as `key=value` words for the report; empty for the fixture itself.
    pub label: String,
    _copy: Option<tempfile::TempDir>,
}

impl Variant {
    fn new(dir: &Path, kwargs: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        if kwargs.is_empty() {
            return Ok(Self {
                dir: dir.to_owned(),
                label: String::new(),
                _copy: None,
            });
        }
        let copy = tempfile::tempdir()?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let target = copy.path().join(&name);
            match name.to_str() {
                Some("processor_config.json") | Some("preprocessor_config.json") => {
                    let mut json: serde_json::Value =
                        serde_json::from_str(&std::fs::read_to_string(entry.path())?)?;
                    let settings = match json.get_mut("image_processor") {
                        Some(nested) => nested,
                        None => &mut json,
                    };
                    let settings = settings
                        .as_object_mut()
                        .ok_or_else(|| anyhow!("{name:?} is not a JSON object"))?;
                    settings.extend(kwargs.clone());
                    std::fs::write(&target, serde_json::to_vec_pretty(&json)?)?;
                }
                _ => std::os::unix::fs::symlink(entry.path().canonicalize()?, &target)?,
            }
        }
        let label = kwargs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Self {
            dir: copy.path().to_owned(),
            label,
            _copy: Some(copy),
        })
    }
}

/// The distinct image-processor settings of the cases and sweep points, the fixture's own first.
fn settings(g: &Goldens) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut all = vec![serde_json::Map::new()];
    let cases = g
        .meta
        .cases
        .iter()
        .map(|c| image_kwargs(&c.processor_kwargs));
    let points = g
        .meta
        .sweep
        .iter()
        .map(|p| image_kwargs(&p.processor_kwargs));
    for kwargs in cases.chain(points) {
        if !all.contains(&kwargs) {
            all.push(kwargs);
        }
    }
    all
}

/// Checks the model registered for the checkpoint in `dir` against its goldens: every case, then the
/// sweep, each on the processor settings HF ran it with.
pub fn check(dir: &Path) -> Result<Report> {
    unpack_tokenizer(dir)?;
    let goldens = Goldens::load(dir)?;
    let mut report = Report {
        arch: goldens.meta.arch.clone(),
        checks: Vec::new(),
    };
    for kwargs in settings(&goldens) {
        let variant = Variant::new(dir, &kwargs)?;
        let loaded = load(&variant.dir)?;
        for case in &goldens.meta.cases {
            if image_kwargs(&case.processor_kwargs) == kwargs {
                check_case(&loaded, &goldens, case, &mut report)?;
            }
        }
        let points: Vec<&SweepPoint> = goldens
            .meta
            .sweep
            .iter()
            .filter(|p| image_kwargs(&p.processor_kwargs) == kwargs)
            .collect();
        check_sweep(&loaded, &points, &variant.label, &mut report)?;
    }
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
            if let Some(digest) = case_digest(g, case, name) {
                let theirs_shape = &digest.shape;
                let same_shape = drop_batch_of_one(&ours.size(), theirs_shape);
                let hash = sha256_le(ours)?;
                let same = same_shape && hash == digest.sha256_le;
                report.push(
                    case,
                    name,
                    same,
                    if same {
                        format!("{:?} bit-identical (SHA-256)", ours.size())
                    } else {
                        format!(
                            "ours {:?} sha256 {}…, HF {:?} {} sha256 {}…",
                            ours.size(),
                            &hash[..12],
                            digest.shape,
                            digest.dtype,
                            &digest.sha256_le[..12.min(digest.sha256_le.len())]
                        )
                    },
                );
                continue;
            }
            if !g.meta.processor_outputs.iter().any(|n| n == name) {
                continue;
            }
            let theirs = g.get(case, name)?;
            // HF batches some outputs by prompt (`[1, images, …]`); mmreg's are per item.
            let theirs =
                if drop_batch_of_one(&ours.size(), &theirs.size()) && ours.dim() < theirs.dim() {
                    theirs.squeeze_dim(0)
                } else {
                    theirs.shallow_clone()
                };
            let theirs = &theirs;
            let same =
                ours.size() == theirs.size() && ours.kind() == theirs.kind() && ours.equal(theirs);
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

/// Whether `ours` is HF's shape, or HF's without a leading batch axis of 1.
fn drop_batch_of_one(ours: &[i64], theirs: &[i64]) -> bool {
    ours == theirs || (theirs.len() == ours.len() + 1 && theirs[0] == 1 && &theirs[1..] == ours)
}

fn case_digest<'a>(g: &'a Goldens, case: &str, name: &str) -> Option<&'a Digest> {
    g.meta
        .cases
        .iter()
        .find(|c| c.name == case)
        .and_then(|c| c.processor_output_digests.get(name))
        // A tensor stored in full is compared in full.
        .filter(|_| g.get(case, name).is_err())
}

/// SHA-256 of a tensor's little-endian, C-order bytes.
fn sha256_le(t: &Tensor) -> Result<String> {
    let t = t.contiguous();
    let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, t.numel())?;
    let digest = sha2::Sha256::digest(&bytes);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
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
fn check_sweep(
    loaded: &Loaded,
    points: &[&SweepPoint],
    label: &str,
    report: &mut Report,
) -> Result<()> {
    let (mut agree, mut differ) = (0, Vec::new());
    for point in points {
        let image = image::DynamicImage::new_rgb8(point.width, point.height);
        let data = MultiModalData {
            images: vec![ImageInput::new("sweep", image)],
            videos: Vec::new(),
        };
        let ours = embedded_rows(loaded, data);
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
        let what = if label.is_empty() {
            "placeholder counts".to_owned()
        } else {
            format!("placeholder counts ({label})")
        };
        report.push(
            "sweep",
            &what,
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

/// The placeholder tokens that take embedding rows for one image (HF's count of image tokens): the
/// model's dummy prompt for one image, processed with this image instead.
fn embedded_rows(loaded: &Loaded, data: MultiModalData) -> mmreg_core::Result<usize> {
    let (entry, ctx) = (loaded.entry, &loaded.ctx);
    let request = DummyRequest {
        seq_len: entry.max_tokens(ctx, Modality::Image)? + 1,
        counts: ModalityCounts::each(&[Modality::Image], 1),
    };
    let mut inputs = entry.dummy_data(ctx, &request)?;
    inputs.multimodal = data;
    let processed = entry.process(ctx, inputs)?;
    Ok(processed
        .placeholders
        .iter()
        .filter(|r| r.modality == Modality::Image)
        .map(|r| r.embedded())
        .sum())
}

/// Every case through the engine in one batch (in order, then reversed), with `options`: the greedy
/// tokens must equal HF's. Cases HF ran with other image-processor settings run in a batch of their own
/// on a checkpoint with those settings.
pub fn check_engine(dir: &Path, options: EngineOptions) -> Result<Report> {
    unpack_tokenizer(dir)?;
    let goldens = Goldens::load(dir)?;
    let mut report = Report {
        arch: goldens.meta.arch.clone(),
        checks: Vec::new(),
    };
    for kwargs in settings(&goldens) {
        let group: Vec<&Case> = goldens
            .meta
            .cases
            .iter()
            .filter(|c| image_kwargs(&c.processor_kwargs) == kwargs)
            .collect();
        if group.is_empty() {
            continue;
        }
        let variant = Variant::new(dir, &kwargs)?;
        let engine = Engine::new(&variant.dir, options.clone())?;
        let cases: Vec<&Case> = group.iter().chain(group.iter().rev()).copied().collect();
        let requests = cases
            .iter()
            .map(|case| goldens.request(dir, case))
            .collect();
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
    }
    Ok(report)
}
