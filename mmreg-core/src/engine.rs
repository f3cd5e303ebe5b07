//! The engine: one model shared by many requests. Requests are preprocessed on worker threads (image
//! decoding, input processor, input mapper), then a scheduler thread runs steps that mix prefills and
//! decodes over one paged KV cache sized at startup by profiling the registered dummy data.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tch::{Device, Kind, Tensor};

use crate::generate::{embed_prompt, prepare, top_token_ids, PreparedInputs};
use crate::inputs::{DummyRequest, ModalityCounts};
use crate::kv_cache::{attention_batch, BlockAllocator, PagedKvCache};
use crate::registry::ModelEntry;
use crate::sampling::{Sampler, SamplingParams};
use crate::{
    cuda, Error, ImageInput, LoadOptions, ModelContext, MultiModalData, MultiModalModel,
    ProcessorInputs, Prompt, Registry, Result, Weights,
};

/// How the engine is set up.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: Device,
    pub dtype: Kind,
    /// Longest sequence (prompt and output); default: the model's.
    pub max_model_len: Option<usize>,
    /// Sequences decoded together at most.
    pub max_num_seqs: usize,
    /// Tokens one step processes at most (a prompt longer than this is rejected).
    pub max_num_batched_tokens: usize,
    /// Share of the GPU's memory the engine may use (weights, activations and KV cache).
    pub gpu_memory_utilization: f64,
    /// KV cache size on the CPU, where there is no memory profile.
    pub cpu_kv_cache_bytes: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Worker threads decoding and preprocessing requests.
    pub preprocess_threads: usize,
    /// Images one prompt may carry.
    pub max_images_per_prompt: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: Kind::Float,
            max_model_len: None,
            max_num_seqs: 64,
            max_num_batched_tokens: 8192,
            gpu_memory_utilization: 0.9,
            cpu_kv_cache_bytes: 1 << 30,
            block_size: 16,
            preprocess_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
            max_images_per_prompt: 4,
        }
    }
}

/// An image as a request carries it.
#[derive(Debug, Clone)]
pub enum ImageSource {
    Path(PathBuf),
    Bytes { name: String, bytes: Vec<u8> },
    Decoded(ImageInput),
}

impl ImageSource {
    fn decode(self) -> Result<ImageInput> {
        match self {
            ImageSource::Path(path) => ImageInput::open(path),
            ImageSource::Bytes { name, bytes } => ImageInput::decode(name, &bytes),
            ImageSource::Decoded(image) => Ok(image),
        }
    }
}

/// One request: a prompt, its images and how to sample.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Prompt,
    pub images: Vec<ImageSource>,
    pub params: SamplingParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the model length.
    Length,
}

/// A finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// With `top_logprobs = k`: the k most likely ids at each generated position.
    pub top_tokens: Vec<Vec<u32>>,
}

/// What a request's stream carries: its tokens as they come, then its end.
#[derive(Debug)]
pub enum Event {
    Token(u32),
    Finished(Completion),
    Failed(Error),
}

/// A submitted request's stream of events.
pub struct RequestHandle {
    events: Receiver<Event>,
}

impl RequestHandle {
    /// The next event; `None` once the request has finished or failed.
    pub fn next_event(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    /// Waits for the end of the request.
    pub fn wait(self) -> Result<Completion> {
        while let Ok(event) = self.events.recv() {
            match event {
                Event::Token(_) => {}
                Event::Finished(completion) => return Ok(completion),
                Event::Failed(error) => return Err(error),
            }
        }
        Err(Error::Registry(
            "the engine stopped before the request finished".into(),
        ))
    }
}

/// What startup measured and decided.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineProfile {
    pub weights_bytes: Option<u64>,
    pub peak_activation_bytes: Option<u64>,
    pub total_device_bytes: Option<u64>,
    /// Tokens and items of the profiling run (from the registered dummy data).
    pub dummy_prompt_tokens: usize,
    pub dummy_items: ModalityCounts,
    pub kv_cache_bytes: u64,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub max_model_len: usize,
}

struct Job {
    request: Request,
    events: Sender<Event>,
}

struct Ready {
    prepared: PreparedInputs,
    params: SamplingParams,
    events: Sender<Event>,
}

/// Counters of the scheduler's decisions.
#[derive(Debug, Default)]
pub struct EngineCounters {
    pub steps: AtomicUsize,
    /// Sequences evicted from the KV cache to make room, and recomputed later.
    pub preemptions: AtomicUsize,
    /// Requests submitted but not yet preprocessed.
    pub preprocessing: AtomicUsize,
    /// Every step's shape and duration (for benchmarks), when enabled with `record_steps`.
    pub step_log: Mutex<Option<Vec<StepTiming>>>,
}

/// One scheduler step: tokens prefilled, sequences decoded, and its wall time including sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTiming {
    pub prefill_tokens: usize,
    pub decodes: usize,
    pub seconds: f64,
}

impl EngineCounters {
    /// Starts (or restarts) recording step timings.
    pub fn record_steps(&self) {
        *self.step_log.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// The steps recorded since `record_steps`.
    pub fn take_steps(&self) -> Vec<StepTiming> {
        self.step_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Vec::new())
            .unwrap_or_default()
    }
}

/// A model serving many requests at once.
pub struct Engine {
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    scheduler: Option<JoinHandle<()>>,
    profile: EngineProfile,
    ctx: Arc<ModelContext>,
    counters: Arc<EngineCounters>,
}

impl Engine {
    /// Loads the checkpoint in `dir`, validates the registry, profiles memory with the model's dummy data
    /// and allocates the KV cache, then starts the worker and scheduler threads.
    pub fn new(dir: impl AsRef<Path>, options: EngineOptions) -> Result<Engine> {
        let dir = dir.as_ref();
        Registry::global().validate()?;
        let ctx = Arc::new(ModelContext::from_dir(dir)?);
        let entry = Registry::global().for_context(&ctx)?;
        let device_index = match options.device {
            Device::Cuda(i) => Some(i),
            _ => None,
        };
        if let Some(i) = device_index {
            cuda::empty_cache();
            cuda::reset_peak_stats(i);
        }
        let load = LoadOptions {
            device: options.device,
            dtype: options.dtype,
        };
        let model = entry.load(&ctx, &Weights::from_dir(dir)?, &load)?;
        let max_model_len = options
            .max_model_len
            .unwrap_or(model.max_model_len())
            .min(model.max_model_len());
        let (cache, profile) = profile_and_allocate(
            entry,
            &ctx,
            model.as_ref(),
            &options,
            max_model_len,
            device_index,
        )?;
        tracing::info!(?profile, "engine ready");

        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let counters = Arc::new(EngineCounters::default());
        let workers = (0..options.preprocess_threads.max(1))
            .map(|_| {
                let (jobs, ready, ctx) = (job_rx.clone(), ready_tx.clone(), ctx.clone());
                let counters = counters.clone();
                let limits = (
                    max_model_len,
                    options.max_num_batched_tokens,
                    options.max_images_per_prompt,
                );
                std::thread::spawn(move || {
                    preprocess_loop(entry, &ctx, &jobs, &ready, &counters, limits)
                })
            })
            .collect();
        let allocator = BlockAllocator::new(profile.kv_blocks, profile.block_size);
        let mut scheduler = Scheduler {
            counters: counters.clone(),
            entry,
            ctx: ctx.clone(),
            model,
            cache,
            allocator,
            waiting: VecDeque::new(),
            running: Vec::new(),
            max_num_seqs: options.max_num_seqs,
            max_num_batched_tokens: options.max_num_batched_tokens,
            max_model_len,
        };
        let scheduler = std::thread::spawn(move || scheduler.run(ready_rx));
        Ok(Engine {
            jobs: Some(job_tx),
            workers,
            scheduler: Some(scheduler),
            profile,
            ctx,
            counters,
        })
    }

    pub fn profile(&self) -> &EngineProfile {
        &self.profile
    }

    pub fn counters(&self) -> &EngineCounters {
        &self.counters
    }

    pub fn context(&self) -> &ModelContext {
        &self.ctx
    }

    /// Queues a request; its events arrive on the returned handle.
    pub fn submit(&self, request: Request) -> RequestHandle {
        let (events, rx) = mpsc::channel();
        match &self.jobs {
            Some(jobs) => {
                self.counters.preprocessing.fetch_add(1, Ordering::SeqCst);
                if let Err(mpsc::SendError(job)) = jobs.send(Job { request, events }) {
                    self.counters.preprocessing.fetch_sub(1, Ordering::SeqCst);
                    let _ = job.events.send(Event::Failed(Error::Registry(
                        "the engine has stopped".into(),
                    )));
                }
            }
            None => {
                let _ = events.send(Event::Failed(Error::Registry(
                    "the engine has stopped".into(),
                )));
            }
        }
        RequestHandle { events: rx }
    }

    /// Runs requests together and returns their results in order.
    pub fn generate(&self, requests: Vec<Request>) -> Vec<Result<Completion>> {
        let handles: Vec<_> = requests.into_iter().map(|r| self.submit(r)).collect();
        handles.into_iter().map(RequestHandle::wait).collect()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the job channel ends the workers, which closes the scheduler's channel in turn.
        self.jobs.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        if let Some(scheduler) = self.scheduler.take() {
            let _ = scheduler.join();
        }
    }
}

/// Runs the registered dummy data for the worst case, measures the activation peak, and sizes the cache:
/// `fraction × total − weights − peak activations` on CUDA, `cpu_kv_cache_bytes` on the CPU.
fn profile_and_allocate(
    entry: &ModelEntry,
    ctx: &ModelContext,
    model: &dyn MultiModalModel,
    options: &EngineOptions,
    max_model_len: usize,
    device_index: Option<usize>,
) -> Result<(PagedKvCache, EngineProfile)> {
    let weights_bytes = device_index
        .and_then(cuda::memory_stats)
        .map(|s| s.allocated);
    let mut counts = ModalityCounts::default();
    for modality in entry.modalities() {
        counts.set(modality, options.max_images_per_prompt);
    }
    // The worst single step: the longest prompt it may hold, with the costliest items.
    let seq_len = options.max_num_batched_tokens.min(max_model_len);
    let dummy = entry.dummy_data(
        ctx,
        &DummyRequest {
            seq_len,
            counts: counts.clone(),
        },
    )?;
    let prepared = prepare(entry, ctx, dummy, usize::MAX)?;
    let dummy_prompt_tokens = prepared.processed.token_ids.len();
    let dummy_items = prepared.processed.multimodal.counts();
    {
        let _guard = tch::no_grad_guard();
        let embeds = embed_prompt(entry, model, prepared)?;
        let spec = model.kv_cache_spec();
        let mut cache = PagedKvCache::new(
            spec,
            dummy_prompt_tokens.div_ceil(options.block_size),
            options.block_size,
            model.device(),
        )?;
        let blocks: Vec<u32> = (0..cache.num_blocks() as u32).collect();
        let batch = attention_batch(
            &[(&blocks, 0, dummy_prompt_tokens)],
            options.block_size,
            true,
            model.device(),
        )?;
        model
            .forward(&embeds, &batch, &mut cache)?
            .f_sum(Kind::Float)?
            .double_value(&[]);
    }
    let peak = device_index
        .and_then(cuda::memory_stats)
        .map(|s| s.peak_allocated);
    let total = device_index
        .and_then(cuda::mem_get_info)
        .map(|(_, total)| total);
    let peak_activation_bytes = peak.zip(weights_bytes).map(|(p, w)| p.saturating_sub(w));
    if let Some(i) = device_index {
        cuda::empty_cache();
        cuda::reset_peak_stats(i);
    }
    let kv_cache_bytes = match (total, weights_bytes, peak_activation_bytes) {
        (Some(total), Some(weights), Some(activations)) => {
            let budget = (total as f64 * options.gpu_memory_utilization) as u64;
            budget.checked_sub(weights + activations).ok_or_else(|| {
                Error::Registry(format!(
                    "no memory is left for the KV cache: {} usable ({} of {}) < weights {} + activations {}; raise gpu_memory_utilization or lower max_num_batched_tokens",
                    human(budget), options.gpu_memory_utilization, human(total), human(weights), human(activations)
                ))
            })?
        }
        _ => options.cpu_kv_cache_bytes as u64,
    };
    let spec = model.kv_cache_spec();
    let kv_blocks =
        (kv_cache_bytes / (spec.bytes_per_token() * options.block_size) as u64) as usize;
    let capacity = kv_blocks * options.block_size;
    if capacity < max_model_len {
        return Err(Error::Registry(format!(
            "the KV cache holds {capacity} tokens ({kv_blocks} blocks of {}, {}) but one sequence may need max_model_len = {max_model_len}; lower max_model_len or give the cache more memory",
            options.block_size,
            human(kv_cache_bytes)
        )));
    }
    let cache = PagedKvCache::new(spec, kv_blocks, options.block_size, model.device())?;
    let profile = EngineProfile {
        weights_bytes,
        peak_activation_bytes,
        total_device_bytes: total,
        dummy_prompt_tokens,
        dummy_items,
        kv_cache_bytes,
        kv_blocks,
        block_size: options.block_size,
        max_model_len,
    };
    Ok((cache, profile))
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{b} bytes"),
    }
}

/// A worker: decodes images, runs the input processor and mappers, checks limits; failures go straight
/// back to their request, so a bad request never reaches the model loop.
fn preprocess_loop(
    entry: &'static ModelEntry,
    ctx: &ModelContext,
    jobs: &Mutex<Receiver<Job>>,
    ready: &Sender<Ready>,
    counters: &EngineCounters,
    (max_model_len, max_batched, max_images): (usize, usize, usize),
) {
    loop {
        let job = match jobs.lock() {
            Ok(jobs) => jobs.recv(),
            Err(_) => return,
        };
        let Ok(Job { request, events }) = job else {
            return;
        };
        let params = request.params.clone();
        let outcome = (|| {
            if request.images.len() > max_images {
                return Err(Error::bad_input(
                    "request",
                    format!(
                        "{} images given but at most {max_images} are allowed per prompt",
                        request.images.len()
                    ),
                ));
            }
            let images = request
                .images
                .into_iter()
                .map(ImageSource::decode)
                .collect::<Result<Vec<_>>>()?;
            let inputs = ProcessorInputs {
                prompt: request.prompt,
                multimodal: MultiModalData::with_images(images),
            };
            // Room for at least one generated token.
            let prepared = prepare(
                entry,
                ctx,
                inputs,
                max_model_len.saturating_sub(1).min(max_batched),
            )?;
            Ok(prepared)
        })();
        match outcome {
            Ok(prepared) => {
                if let Err(mpsc::SendError(ready)) = ready.send(Ready {
                    prepared,
                    params,
                    events,
                }) {
                    let _ = ready.events.send(Event::Failed(Error::Registry(
                        "the engine has stopped".into(),
                    )));
                }
            }
            Err(error) => {
                let _ = events.send(Event::Failed(error));
            }
        }
        counters.preprocessing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long an idle scheduler waits for the rest of a burst of requests to be preprocessed.
const BURST_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// A request inside the scheduler.
struct Sequence {
    prepared: PreparedInputs,
    params: SamplingParams,
    sampler: Sampler,
    events: Sender<Event>,
    generated: Vec<u32>,
    top_tokens: Vec<Vec<u32>>,
    blocks: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    cached: usize,
}

impl Sequence {
    fn prompt_len(&self) -> usize {
        self.prepared.processed.token_ids.len()
    }

    fn len(&self) -> usize {
        self.prompt_len() + self.generated.len()
    }
}

struct Scheduler {
    counters: Arc<EngineCounters>,
    entry: &'static ModelEntry,
    ctx: Arc<ModelContext>,
    model: Box<dyn MultiModalModel>,
    cache: PagedKvCache,
    allocator: BlockAllocator,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    max_model_len: usize,
}

impl Scheduler {
    fn run(&mut self, ready: Receiver<Ready>) {
        let _guard = tch::no_grad_guard();
        loop {
            // Block only when idle; otherwise take whatever has arrived and keep stepping.
            if self.running.is_empty() && self.waiting.is_empty() {
                match ready.recv() {
                    Ok(r) => self.enqueue(r),
                    Err(_) => return,
                }
                // Waking from idle: let a burst of submissions finish preprocessing (briefly) so that
                // their prefills share the first step.
                let deadline = std::time::Instant::now() + BURST_WAIT;
                while self.counters.preprocessing.load(Ordering::SeqCst) > 0 {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    match ready.recv_timeout(left) {
                        Ok(r) => self.enqueue(r),
                        Err(_) => break,
                    }
                }
            }
            while let Ok(r) = ready.try_recv() {
                self.enqueue(r);
            }
            if let Err(error) = self.step() {
                // A failed step fails the sequences in it; the engine carries on.
                let message = error.to_string();
                for seq in self.running.drain(..) {
                    let _ = seq.events.send(Event::Failed(Error::Registry(format!(
                        "model step failed: {message}"
                    ))));
                    self.allocator.release(&mut { seq.blocks });
                }
            }
        }
    }

    fn enqueue(&mut self, ready: Ready) {
        self.waiting.push_back(Sequence {
            sampler: Sampler::new(&ready.params),
            prepared: ready.prepared,
            params: ready.params,
            events: ready.events,
            generated: Vec::new(),
            top_tokens: Vec::new(),
            blocks: Vec::new(),
            cached: 0,
        });
    }

    /// Admits waiting sequences that fit, makes room for every decode (preempting the newest sequences
    /// if the pool runs dry; they are recomputed later), and runs one step.
    fn step(&mut self) -> Result<()> {
        let mut budget = self
            .max_num_batched_tokens
            .saturating_sub(self.running.len());
        while let Some(seq) = self.waiting.front_mut() {
            let tokens = seq.len();
            let fits = self.running.len() < self.max_num_seqs
                && (tokens <= budget || self.running.is_empty());
            if !fits || !self.allocator.grow(&mut seq.blocks, tokens + 1) {
                break;
            }
            budget = budget.saturating_sub(tokens);
            let seq = self.waiting.pop_front().expect("front exists");
            self.running.push(seq);
        }
        // Every running sequence needs room for the token this step adds.
        let mut i = 0;
        while i < self.running.len() {
            let needed = self.running[i].len() + 1;
            if self.allocator.grow(&mut self.running[i].blocks, needed) {
                i += 1;
            } else if let Some(mut victim) = self.running.pop() {
                self.counters.preemptions.fetch_add(1, Ordering::Relaxed);
                self.allocator.release(&mut victim.blocks);
                victim.cached = 0;
                self.waiting.push_front(victim);
            }
        }
        if self.running.is_empty() {
            if let Some(seq) = self.waiting.pop_front() {
                let error = Error::Registry(format!(
                    "the KV cache ({} blocks) cannot hold a sequence of {} tokens",
                    self.allocator.total_blocks(),
                    seq.len()
                ));
                let _ = seq.events.send(Event::Failed(error));
            }
            return Ok(());
        }
        self.forward_and_sample()
    }

    fn forward_and_sample(&mut self) -> Result<()> {
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let device = self.model.device();
        let mut embeds = Vec::with_capacity(self.running.len());
        let mut layout = Vec::with_capacity(self.running.len());
        for seq in &self.running {
            let new_tokens = if seq.cached == 0 {
                // Prefill, or recompute after preemption: the prompt (with its images), then what was generated.
                let prompt = embed_prompt(
                    self.entry,
                    self.model.as_ref(),
                    seq.prepared.shallow_clone(),
                )?;
                let generated: Vec<i64> = seq.generated.iter().map(|&t| t as i64).collect();
                if generated.is_empty() {
                    embeds.push(prompt);
                } else {
                    let more = self
                        .model
                        .embed_tokens(&Tensor::from_slice(&generated).to_device(device))?;
                    embeds.push(Tensor::cat(&[prompt, more.to_kind(self.model.dtype())], 0));
                }
                seq.len()
            } else {
                let last = seq.generated.last().copied().unwrap_or_default() as i64;
                embeds.push(
                    self.model
                        .embed_tokens(&Tensor::from_slice(&[last]).to_device(device))?,
                );
                1
            };
            layout.push((seq.blocks.as_slice(), seq.len() - new_tokens, new_tokens));
        }
        let batch = attention_batch(&layout, self.cache.block_size(), true, device)?;
        // (context, new tokens) per sequence, for the step log.
        let shape: Vec<(usize, usize)> = layout
            .iter()
            .map(|&(_, context, new)| (context, new))
            .collect();
        let logits = self
            .model
            .forward(&Tensor::cat(&embeds, 0), &batch, &mut self.cache)?;
        // One host transfer for every greedy row (which also waits for the step to finish).
        let greedy = Vec::<i64>::try_from(logits.f_argmax(-1, false)?.to_device(Device::Cpu))?;
        if let Some(log) = self
            .counters
            .step_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let prefill_tokens = shape
                .iter()
                .filter(|&&(context, _)| context == 0)
                .map(|&(_, new)| new)
                .sum();
            let decodes = shape.iter().filter(|&&(context, _)| context > 0).count();
            log.push(StepTiming {
                prefill_tokens,
                decodes,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let mut finished = Vec::new();
        for (row, seq) in self.running.iter_mut().enumerate() {
            seq.cached = seq.len();
            let logits_row = logits.get(row as i64);
            if seq.params.top_logprobs > 0 {
                seq.top_tokens
                    .push(top_token_ids(&logits_row, seq.params.top_logprobs)?);
            }
            let token = if seq.params.is_greedy() {
                greedy[row] as u32
            } else {
                seq.sampler.sample(&logits_row)?
            };
            seq.generated.push(token);
            let _ = seq.events.send(Event::Token(token));
            if let Some(reason) = finish_reason(&self.ctx, self.max_model_len, seq) {
                finished.push((row, reason));
            }
        }
        for &(row, reason) in finished.iter().rev() {
            let mut seq = self.running.remove(row);
            self.allocator.release(&mut seq.blocks);
            let prompt_tokens = seq.prompt_len();
            let mut text = decode(&self.ctx, &seq.generated);
            if let Some(at) = stop_string_at(&text, &seq.params.stop) {
                text.truncate(at);
            }
            let completion = Completion {
                token_ids: seq.generated,
                text,
                finish_reason: reason,
                prompt_tokens,
                top_tokens: seq.top_tokens,
            };
            let _ = seq.events.send(Event::Finished(completion));
        }
        Ok(())
    }
}

fn finish_reason(ctx: &ModelContext, max_model_len: usize, seq: &Sequence) -> Option<FinishReason> {
    let last = *seq.generated.last()?;
    if seq.params.is_stop(last) {
        return Some(FinishReason::Stop);
    }
    if !seq.params.stop.is_empty()
        && stop_string_at(&decode(ctx, &seq.generated), &seq.params.stop).is_some()
    {
        return Some(FinishReason::Stop);
    }
    (seq.generated.len() >= seq.params.max_tokens || seq.len() >= max_model_len)
        .then_some(FinishReason::Length)
}

/// Generated text without special tokens (empty for a checkpoint without a tokenizer).
fn decode(ctx: &ModelContext, tokens: &[u32]) -> String {
    match ctx.tokenizer() {
        Ok(tokenizer) => tokenizer.decode(tokens, true).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Byte offset where the earliest stop string starts in `text`.
fn stop_string_at(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}
