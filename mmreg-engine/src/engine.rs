//! The engine: one model shared by many requests. Requests are preprocessed on worker threads (image
//! decoding, input processor, input mapper), then a scheduler thread runs steps that mix prefills and
//! decodes over one paged KV cache sized at startup by profiling the registered dummy data.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tch::{Device, Kind};

use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    Collectives, Error, ImageInput, LoadOptions, Modality, ModalityCounts, ModelContext,
    MultiModalData, MultiModalModel, ProcessorInputs, Prompt, Registry, Result, VideoInput,
    Weights,
};

use crate::block_pool::{BlockPool, Hash};
use crate::cuda;
use crate::dist::{new_group, Backend};
use crate::encoder_cache::processor_settings;
use crate::items::{pin_items, prepare_request, PinnedBudget, PreparedRequest};
use crate::limits::MultiModalLimits;
use crate::profile::{allocate, dummy_forward, profile_and_allocate};
use crate::ranks::{RankState, Ranks};
use crate::sampling::SamplingParams;
use crate::scheduler::{self, Scheduler};
use crate::sliding_pool::SlidingPool;
use crate::step_graphs::FixedShapeSteps;

/// How the engine is set up.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: Device,
    pub dtype: Kind,
    /// Longest sequence (prompt and output); default: the model's.
    pub max_model_len: Option<usize>,
    /// Sequences decoded together at most.
    pub max_num_seqs: usize,
    /// Tokens one step computes at most: a longer prompt is prefilled in chunks over several steps,
    /// beside the running decodes. Also the encoder budget: an item with more feature rows than
    /// `max(max_num_batched_tokens, the largest item profiled)` is refused.
    pub max_num_batched_tokens: usize,
    /// Split a prompt over steps so that each step fills `max_num_batched_tokens` (vLLM's
    /// `--enable-chunked-prefill`, on by default), where that lets a waiting prompt finish a step sooner:
    /// a prompt that fits a step of its own and would finish in the next step either way, with the
    /// prompts behind it, goes whole in the next step. Off, a prompt is prefilled in one step: one that
    /// does not fit in what is left of a step's budget waits for the next step, and so do the prompts
    /// behind it. A prompt longer than `max_num_batched_tokens` (which vLLM would refuse) is still split.
    pub enable_chunked_prefill: bool,
    /// Reuse the KV-cache blocks of a prefix computed before (the hash of each block covers its tokens
    /// and the images in it).
    pub prefix_caching: bool,
    /// Bytes of encoder outputs (vision-tower features) kept by item hash for reuse; 0 keeps none.
    pub encoder_cache_bytes: usize,
    /// Share of the GPU's memory the engine may use (weights, activations and KV cache).
    pub gpu_memory_utilization: f64,
    /// KV cache size on the CPU, where there is no memory profile. 0 (the default): room for
    /// `max_num_seqs` sequences of `max_model_len` tokens, at most half the memory still available once
    /// the weights are loaded, and at least one sequence.
    pub cpu_kv_cache_bytes: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Worker threads decoding and preprocessing requests.
    pub preprocess_threads: usize,
    /// Items of each modality one prompt may carry, and how large (`--limit-mm-per-prompt`); startup
    /// profiling runs that many of the largest.
    pub limit_mm_per_prompt: MultiModalLimits,
    /// Run decode-only steps and lone prefills of short prompts in fixed shapes (batch, context and prompt
    /// length rounded up to buckets), captured once per bucket as CUDA graphs and replayed. `None`:
    /// wherever CUDA graphs work and the model allows it ([`MultiModalModel::supports_cuda_graphs`]);
    /// `MMREG_NO_CUDA_GRAPHS=1` turns them off. `Some(true)` on the CPU runs the same fixed-shape steps
    /// without capture (the tests compare those).
    pub cuda_graphs: Option<bool>,
    /// Ranks of tensor parallelism (`--tensor-parallel-size`): the decoder's heads, MLP and vocabulary
    /// split over this many devices (`cuda:i..i+N` from `device = cuda:i`; CPU ranks share the CPU), one
    /// thread per rank, collectives through c10d (NCCL on GPUs, Gloo on CPUs). 1: no parallelism.
    pub tensor_parallel_size: usize,
    /// How long a collective waits for a peer rank before it fails (and with it the step).
    pub tensor_parallel_timeout: std::time::Duration,
    /// How a tensor-parallel engine runs the vision tower: replicated and run on rank 0, replicated and
    /// each rank encoding a share of a step's items (vLLM's `mm_encoder_tp_mode="data"`), or sharded
    /// over the ranks like the decoder (`"weights"`).
    pub mm_encoder_tp_mode: EncoderTpMode,
    /// How long an idle engine, woken by a request, waits for the rest of a burst of submissions to be
    /// preprocessed so that their prefills share the first step (it stops waiting as soon as none is left).
    pub burst_wait: std::time::Duration,
    /// Async scheduling (vLLM's `--async-scheduling`): a decode step in fixed shapes whose sequences are
    /// all greedy without log-probabilities is issued before the host has read the previous step's
    /// tokens, which it takes from the device, so the GPU does not sit idle while the host streams
    /// tokens and prepares the step. A sequence that stops costs one wasted row of one step. On by
    /// default (on an H200 it gave more decode tokens/s at every batch of both 7B shapes measured:
    /// docs/benchmarks.md, run 61); `MMREG_ASYNC_SCHEDULING=0` turns it off.
    pub async_scheduling: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: Kind::Float,
            max_model_len: None,
            max_num_seqs: 64,
            max_num_batched_tokens: 8192,
            enable_chunked_prefill: true,
            prefix_caching: true,
            encoder_cache_bytes: 1 << 30,
            gpu_memory_utilization: 0.9,
            cpu_kv_cache_bytes: 0,
            block_size: 16,
            preprocess_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
            limit_mm_per_prompt: MultiModalLimits::default(),
            cuda_graphs: None,
            tensor_parallel_size: 1,
            tensor_parallel_timeout: std::time::Duration::from_secs(300),
            mm_encoder_tp_mode: EncoderTpMode::Rank0,
            burst_wait: std::time::Duration::from_millis(20),
            async_scheduling: !std::env::var("MMREG_ASYNC_SCHEDULING").is_ok_and(|v| v == "0"),
        }
    }
}

/// Where a tensor-parallel engine encodes a step's images and videos (see
/// [`EngineOptions::mm_encoder_tp_mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncoderTpMode {
    /// Rank 0 encodes every item.
    #[default]
    Rank0,
    /// Each rank encodes a share of the step's calls of the modality's path.
    Data,
    /// The CLIP/SigLIP towers split over the ranks by heads and MLP features; every rank runs every
    /// call (other towers stay replicated and every rank computes them alike).
    Weights,
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
    /// Videos, each given as its frames in order.
    pub videos: Vec<Vec<ImageSource>>,
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
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// With `top_logprobs = k`: the k most likely ids at each generated position.
    pub top_tokens: Vec<Vec<u32>>,
    /// With `logprobs` or `top_logprobs` asked for: one entry per generated token.
    pub logprobs: Vec<TokenLogprobs>,
}

/// Log-probabilities at one generated position, from the model's raw distribution (before temperature,
/// top-k and top-p), as OpenAI's API and vLLM report them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// The `top_logprobs` most likely `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What a request's stream carries: its tokens as they come, then its end. With logprobs asked for,
/// each `Token` is preceded by the `Logprobs` of its position.
#[derive(Debug)]
pub enum Event {
    Token(u32),
    Logprobs(TokenLogprobs),
    Finished(Completion),
    Failed(Error),
}

/// Cancels a submitted request: the scheduler drops it before its next step (or before its prefill, if
/// it is still waiting) and frees its KV-cache blocks. Cancelling a finished request does nothing.
#[derive(Debug, Clone, Default)]
pub struct Canceller(Arc<AtomicBool>);

impl Canceller {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Where a request's events go, and whether its receiver still wants them.
pub(crate) struct EventSink {
    deliver: Box<dyn Fn(Event) -> bool + Send>,
    canceller: Canceller,
}

impl EventSink {
    /// Delivers an event; a receiver that has gone away cancels the request.
    pub(crate) fn send(&self, event: Event) {
        if !(self.deliver)(event) {
            self.canceller.cancel();
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.canceller.is_cancelled()
    }
}

/// A submitted request's stream of events. Dropping the handle before the end cancels the request
/// (a client that went away should not hold KV-cache blocks).
pub struct RequestHandle {
    events: Receiver<Event>,
    canceller: Canceller,
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.canceller.cancel();
    }
}

impl RequestHandle {
    /// Cancels the request; its stream ends without `Finished`.
    pub fn cancel(&self) {
        self.canceller.cancel();
    }

    /// The next event; `None` once the request has finished or failed.
    pub fn next_event(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    /// Waits for the end of the request.
    pub fn wait(self) -> Result<Completion> {
        while let Ok(event) = self.events.recv() {
            match event {
                Event::Token(_) | Event::Logprobs(_) => {}
                Event::Finished(completion) => return Ok(completion),
                Event::Failed(error) => return Err(error),
            }
        }
        Err(Error::Engine(
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
    /// Free device memory before the weights were loaded (what `gpu_memory_utilization` is a share of).
    pub free_device_bytes: Option<u64>,
    /// Tokens and items of the profiling run (from the registered dummy data).
    pub dummy_prompt_tokens: usize,
    pub dummy_items: ModalityCounts,
    /// Feature rows of the largest item profiled (with `max_num_batched_tokens`, the encoder budget).
    pub largest_item_tokens: usize,
    pub kv_cache_bytes: u64,
    /// Blocks of the global layers (every layer's, for a model without sliding-window layers).
    pub kv_blocks: usize,
    /// Blocks of the sliding-window layers' own pool (its null block included); 0 without one.
    pub sliding_blocks: usize,
    pub block_size: usize,
    pub max_model_len: usize,
}

struct Job {
    request: Request,
    events: EventSink,
}

pub(crate) struct Ready {
    pub(crate) prepared: PreparedRequest,
    pub(crate) params: SamplingParams,
    pub(crate) events: EventSink,
}

/// Counters of the scheduler's decisions.
#[derive(Debug, Default)]
pub struct EngineCounters {
    pub steps: AtomicUsize,
    /// Sequences evicted from the KV cache to make room, and recomputed later.
    pub preemptions: AtomicUsize,
    /// Requests submitted but not yet preprocessed and taken by the scheduler.
    pub preprocessing: AtomicUsize,
    /// Every step's shape and duration (for benchmarks), when enabled with `record_steps`.
    pub step_log: Mutex<Option<Vec<StepTiming>>>,
    /// Benchmarks only: wait for each packed step's embeddings to time them apart
    /// ([`StepTiming::embed_seconds`]); the wait itself slows the step a little.
    pub time_embeddings: std::sync::atomic::AtomicBool,
    /// Preprocessed requests waiting for a sequence slot and KV-cache blocks (after each step).
    pub waiting: AtomicUsize,
    /// Sequences in the running batch (after each step).
    pub running: AtomicUsize,
    /// KV-cache blocks held by sequences (after each step), out of `kv_blocks_total`.
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// The same for the sliding-window layers' own pool (0 without one), and the most ever held there.
    pub kv_sliding_blocks_used: AtomicUsize,
    pub kv_sliding_blocks_total: AtomicUsize,
    pub kv_sliding_blocks_peak: AtomicUsize,
    /// Requests cancelled (or whose receiver went away) before they finished.
    pub cancelled: AtomicUsize,
    /// Wall time of every step so far, in microseconds (with `steps`: the mean step time).
    pub step_micros: AtomicU64,
    /// Prompt tokens of admitted requests, and how many of them the prefix cache served.
    pub prefix_cache_queries: AtomicUsize,
    pub prefix_cache_hits: AtomicUsize,
    /// Multimodal items whose features came from the encoder cache, and items encoded (each a part of
    /// a call of the modality's path).
    pub encoder_cache_hits: AtomicUsize,
    pub encoder_cache_misses: AtomicUsize,
    /// Bytes the encoder cache holds (after each step).
    pub encoder_cache_bytes: AtomicUsize,
    /// Calls of a modality's path run on tensor-parallel ranks other than rank 0
    /// ([`EncoderTpMode::Data`]).
    pub encoder_calls_on_other_ranks: AtomicUsize,
}

/// One scheduler step: tokens prefilled, sequences decoded, and its wall time including sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTiming {
    pub prefill_tokens: usize,
    pub decodes: usize,
    /// Until the step's embeddings (the vision path included) were ready, with
    /// [`EngineCounters::time_embeddings`] on; 0 otherwise.
    pub embed_seconds: f64,
    /// Until the host had issued the step's forward (on a GPU the kernels, or the graph's replay, are
    /// then queued; what follows in `seconds` is mostly waiting for them and the sampled tokens).
    pub issued_seconds: f64,
    /// From its start, or from when the step before was landed if that was later (an overlapped step),
    /// until its tokens were on the host.
    pub seconds: f64,
    /// Issued before the step before it had been landed (async scheduling).
    pub overlapped: bool,
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

/// The device of each tensor-parallel rank: `cuda:i + r` from `cuda:i`, the CPU for every rank on the
/// CPU.
fn rank_devices(device: Device, ranks: usize) -> Result<Vec<Device>> {
    match device {
        Device::Cuda(first) => {
            let available = tch::Cuda::device_count() as usize;
            if first + ranks > available {
                return Err(Error::Engine(format!(
                    "--tensor-parallel-size {ranks} from cuda:{first} needs {} CUDA devices; {available} are visible",
                    first + ranks
                )));
            }
            Ok((0..ranks).map(|r| Device::Cuda(first + r)).collect())
        }
        other => Ok(vec![other; ranks]),
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
        // What is free before the weights: another process's memory is not ours to plan with.
        let free_before_load = device_index
            .and_then(cuda::mem_get_info)
            .map(|(free, _)| free);
        // Tensor parallelism: a c10d group of one rank per device, ranks past the first on threads of
        // their own, each loading its shard of the checkpoint while rank 0 loads its own.
        let tp = options.tensor_parallel_size.max(1);
        let devices = rank_devices(options.device, tp)?;
        // MMREG_TP_GROUP=1 makes a group even of one rank, so that one GPU runs the collectives (NCCL
        // inside the CUDA graphs) as every rank of a larger group would.
        let one_rank_group = std::env::var("MMREG_TP_GROUP").is_ok_and(|v| v == "1");
        let groups = if tp > 1 || one_rank_group {
            let backend = match options.device {
                Device::Cuda(_) => Backend::Nccl,
                _ => Backend::Gloo,
            };
            new_group(tp, backend, options.tensor_parallel_timeout)?
        } else {
            Vec::new()
        };
        let shard_vision_tower = options.mm_encoder_tp_mode == EncoderTpMode::Weights;
        let load_rank = {
            let (dir, ctx, dtype) = (dir.to_path_buf(), ctx.clone(), options.dtype);
            let (groups, devices) = (groups.clone(), devices.clone());
            move |rank: usize| -> Result<Box<dyn MultiModalModel>> {
                let load = LoadOptions {
                    device: devices[rank],
                    dtype,
                    tensor_parallel: groups.get(rank).map(|g| g.clone() as Arc<dyn Collectives>),
                    shard_vision_tower,
                };
                entry.load(&ctx, &Weights::from_dir(&dir)?, &load)
            }
        };
        let mut ranks = match tp {
            1 => None,
            _ => Some(Ranks::spawn(&groups, &devices, load_rank.clone())?),
        };
        let model = load_rank(0);
        if let Some(ranks) = &mut ranks {
            ranks.finish()?;
        }
        let model = model?;
        let max_model_len = options
            .max_model_len
            .unwrap_or(model.max_model_len())
            .min(model.max_model_len());
        // Every rank runs the dummy step with rank 0 (their collectives meet), which sizes the cache.
        if let Some(ranks) = &mut ranks {
            let opts = options.clone();
            let ctx = ctx.clone();
            ranks.start(|_, _| {
                let (opts, ctx) = (opts.clone(), ctx.clone());
                Box::new(move |state: &mut RankState| {
                    dummy_forward(entry, &ctx, state.model.as_ref(), &opts, max_model_len)
                        .map(|_| ())
                })
            })?;
        }
        let profiled = profile_and_allocate(
            entry,
            &ctx,
            model.as_ref(),
            &options,
            max_model_len,
            device_index,
            free_before_load,
        );
        if let Some(ranks) = &mut ranks {
            ranks.finish()?;
        }
        let (cache, profile) = profiled?;
        tracing::info!(?profile, "engine ready");

        let settings = processor_settings(&ctx);
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let counters = Arc::new(EngineCounters::default());
        let pinned = PinnedBudget::new(PINNED_ITEM_BYTES);
        let workers = (0..options.preprocess_threads.max(1))
            .map(|_| {
                let (jobs, ready, ctx) = (job_rx.clone(), ready_tx.clone(), ctx.clone());
                let counters = counters.clone();
                let limits = Limits {
                    max_len: max_model_len.saturating_sub(1),
                    mm: options.limit_mm_per_prompt.clone(),
                    encoder_budget: options
                        .max_num_batched_tokens
                        .max(profile.largest_item_tokens),
                    settings,
                    device: options.device,
                    pinned: pinned.clone(),
                };
                std::thread::spawn(move || {
                    preprocess_loop(entry, &ctx, &jobs, &ready, &counters, limits)
                })
            })
            .collect();
        let fixed_steps = options
            .cuda_graphs
            .unwrap_or(options.device.is_cuda() && cuda::graphs_available())
            && model.supports_cuda_graphs()
            && profile.kv_blocks > 1;
        // Fixed-shape steps keep the pool's last block as scratch space for their padding rows.
        let usable_blocks = profile.kv_blocks - usize::from(fixed_steps);
        let pool = BlockPool::new(usable_blocks, profile.block_size, options.prefix_caching);
        counters
            .kv_blocks_total
            .store(usable_blocks, Ordering::Relaxed);
        // The sliding-window layers' pool keeps its own null block, also their scratch space.
        let sliding = model
            .kv_cache_spec()
            .sliding
            .filter(|_| profile.sliding_blocks > 0)
            .map(|s| {
                SlidingPool::new(
                    profile.sliding_blocks,
                    profile.block_size,
                    s.window,
                    options.prefix_caching,
                )
            });
        if let Some(sliding) = &sliding {
            counters
                .kv_sliding_blocks_total
                .store(sliding.total_blocks(), Ordering::Relaxed);
        }
        let fixed_steps = fixed_steps.then(|| {
            FixedShapeSteps::new(
                options.device,
                profile.block_size,
                (usable_blocks * profile.block_size) as i64,
                sliding.as_ref().map(|s| (s.null_slot(), s.window())),
                options.max_num_seqs,
                model.position_sections(),
            )
        });
        let mut scheduler = Scheduler::new(
            counters.clone(),
            entry,
            ctx.clone(),
            model,
            cache,
            pool,
            sliding,
            fixed_steps,
            &options,
            max_model_len,
        );
        if let Some(mut ranks) = ranks {
            // The other ranks' caches and fixed-shape steps, the same sizes as rank 0's.
            let (kv, sliding_blocks, block) = (
                profile.kv_blocks,
                profile.sliding_blocks,
                profile.block_size,
            );
            let fixed = scheduler.has_fixed_steps().then_some((
                (usable_blocks * block) as i64,
                scheduler.sliding_null_slot(),
                options.max_num_seqs,
            ));
            ranks.run(
                |_, device| {
                    Box::new(move |state: &mut RankState| {
                        let spec = state.model.kv_cache_spec();
                        state.cache = Some(allocate(spec, kv, sliding_blocks, block, device)?);
                        state.fixed = fixed.map(|(scratch, sliding, seqs)| {
                            FixedShapeSteps::new(
                                device,
                                block,
                                scratch,
                                sliding,
                                seqs,
                                state.model.position_sections(),
                            )
                        });
                        Ok(())
                    })
                },
                || Ok(()),
            )?;
            scheduler.set_ranks(ranks);
        }
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
        let canceller = self.submit_with(request, move |event| events.send(event).is_ok());
        RequestHandle {
            events: rx,
            canceller,
        }
    }

    /// Queues a request whose events are handed to `on_event` (on the engine's threads: it must not
    /// block), for callers that are not threads waiting on a channel, such as an async server.
    /// `on_event` returning false means the receiver has gone: the request is cancelled.
    pub fn submit_with(
        &self,
        request: Request,
        on_event: impl Fn(Event) -> bool + Send + 'static,
    ) -> Canceller {
        let canceller = Canceller::default();
        let events = EventSink {
            deliver: Box::new(on_event),
            canceller: canceller.clone(),
        };
        match &self.jobs {
            Some(jobs) => {
                self.counters.preprocessing.fetch_add(1, Ordering::SeqCst);
                if let Err(mpsc::SendError(job)) = jobs.send(Job { request, events }) {
                    self.counters.preprocessing.fetch_sub(1, Ordering::SeqCst);
                    job.events.send(Event::Failed(Error::Engine(
                        "the engine has stopped".into(),
                    )));
                }
            }
            None => {
                events.send(Event::Failed(Error::Engine(
                    "the engine has stopped".into(),
                )));
            }
        }
        canceller
    }

    /// Runs requests together and returns their results in order. An idle engine starts them as one
    /// burst: until the last is submitted it counts as one more request being preprocessed, which the
    /// scheduler's `burst_wait` waits for.
    pub fn generate(&self, requests: Vec<Request>) -> Vec<Result<Completion>> {
        let preprocessing = &self.counters.preprocessing;
        preprocessing.fetch_add(1, Ordering::SeqCst);
        let handles: Vec<_> = requests.into_iter().map(|r| self.submit(r)).collect();
        preprocessing.fetch_sub(1, Ordering::SeqCst);
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

/// Host memory that the items of the requests in the engine may hold pinned at once (1 GiB: about 150
/// LLaVA-NeXT images); items past it are copied into pinned memory when their step uploads them.
const PINNED_ITEM_BYTES: usize = 1 << 30;

/// What a worker checks a request against.
struct Limits {
    /// Longest prompt after expansion (room for one generated token).
    max_len: usize,
    mm: MultiModalLimits,
    /// Most feature rows of one item.
    encoder_budget: usize,
    /// The model's device, and the pinned host memory its items may hold (see [`pin_items`]).
    device: Device,
    pinned: Arc<PinnedBudget>,
    /// [`processor_settings`] of the checkpoint, for item hashes.
    settings: Hash,
}

/// A worker: decodes images, runs the input processor and mappers, hashes the items, checks limits;
/// failures go straight back to their request, so a bad request never reaches the model loop.
fn preprocess_loop(
    entry: &'static ModelEntry,
    ctx: &ModelContext,
    jobs: &Mutex<Receiver<Job>>,
    ready: &Sender<Ready>,
    counters: &EngineCounters,
    limits: Limits,
) {
    loop {
        let job = match jobs.lock() {
            Ok(jobs) => jobs.recv(),
            Err(_) => return,
        };
        let Ok(Job { request, events }) = job else {
            return;
        };
        if events.is_cancelled() {
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
            counters.preprocessing.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let params = request.params.clone();
        // The model's registered functions run here; a panic in one is this request's error.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Counts first: too many images are refused before any is decoded.
            limits.mm.check_count(Modality::Image, request.images.len())?;
            limits.mm.check_count(Modality::Video, request.videos.len())?;
            let images = request
                .images
                .into_iter()
                .map(ImageSource::decode)
                .collect::<Result<Vec<_>>>()?;
            let videos = request
                .videos
                .into_iter()
                .enumerate()
                .map(|(i, frames)| {
                    let frames = frames
                        .into_iter()
                        .map(|f| ImageSource::decode(f).map(|f| f.image))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(VideoInput::new(format!("video #{i}"), frames))
                })
                .collect::<Result<Vec<_>>>()?;
            let multimodal = MultiModalData { images, videos };
            limits.mm.check(&multimodal)?;
            let inputs = ProcessorInputs {
                prompt: request.prompt,
                multimodal,
            };
            let mut prepared =
                prepare_request(entry, ctx, &limits.settings, inputs, limits.max_len)?;
            if let Some(item) = prepared
                .items
                .iter()
                .find(|item| item.rows.len() > limits.encoder_budget)
            {
                return Err(Error::bad_input(
                    "request",
                    format!(
                        "{} #{} needs {} encoder tokens but the encoder budget is {} (the larger of --max-num-batched-tokens and the largest item profiled)",
                        item.modality,
                        item.item,
                        item.rows.len(),
                        limits.encoder_budget
                    ),
                ));
            }
            pin_items(&mut prepared.items, entry, limits.device, &limits.pinned)?;
            Ok(prepared)
        }))
        .unwrap_or_else(|panic| {
            Err(Error::Engine(scheduler::panic_message(
                "preprocessing",
                panic,
            )))
        });
        let handed_over = match outcome {
            Ok(prepared) => match ready.send(Ready {
                prepared,
                params,
                events,
            }) {
                Ok(()) => true,
                Err(mpsc::SendError(ready)) => {
                    ready.events.send(Event::Failed(Error::Engine(
                        "the engine has stopped".into(),
                    )));
                    false
                }
            },
            Err(error) => {
                events.send(Event::Failed(error));
                false
            }
        };
        // A request handed over is counted off by the scheduler as it takes it, so that a burst's wait
        // never sees a request it already holds as still being preprocessed.
        if !handed_over {
            counters.preprocessing.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
