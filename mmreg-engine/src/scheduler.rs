//! The scheduler thread: admits prepared requests into the KV cache, runs steps that mix prefills and
//! decodes, samples, streams tokens, and finishes or preempts sequences.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use tch::{Device, Tensor};

use mmreg_core::registry::ModelEntry;
use mmreg_core::{Error, ModelContext, MultiModalModel, PagedKvCache, Result, Step};

use crate::blocks::{attention_batch, set_positions, BlockAllocator, SeqPositions};
use crate::engine::{
    Completion, EngineCounters, EngineOptions, Event, EventSink, FinishReason, Ready, StepTiming,
    TokenLogprobs,
};
use crate::generate::{embed_prompts, top_token_ids, PreparedInputs};
use crate::sampling::{token_logprobs, Sampler, SamplingParams};
use crate::step_graphs::{DecodeRow, FixedShapeSteps};

/// A request inside the scheduler.
struct Sequence {
    prepared: PreparedInputs,
    params: SamplingParams,
    sampler: Sampler,
    events: EventSink,
    generated: Vec<u32>,
    top_tokens: Vec<Vec<u32>>,
    logprobs: Vec<TokenLogprobs>,
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

pub(crate) struct Scheduler {
    counters: Arc<EngineCounters>,
    entry: &'static ModelEntry,
    ctx: Arc<ModelContext>,
    model: Box<dyn MultiModalModel>,
    cache: PagedKvCache,
    allocator: BlockAllocator,
    /// Decode-only steps and lone prefills in fixed shapes (CUDA graphs on a GPU), where enabled.
    fixed_steps: Option<FixedShapeSteps>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    max_model_len: usize,
    /// Items per call of a modality's path when a step's prefills run it together: what startup
    /// profiling measured (`max_images_per_prompt`).
    max_items_per_embed: usize,
    burst_wait: std::time::Duration,
}

impl Scheduler {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        counters: Arc<EngineCounters>,
        entry: &'static ModelEntry,
        ctx: Arc<ModelContext>,
        model: Box<dyn MultiModalModel>,
        cache: PagedKvCache,
        allocator: BlockAllocator,
        fixed_steps: Option<FixedShapeSteps>,
        options: &EngineOptions,
        max_model_len: usize,
    ) -> Self {
        Self {
            counters,
            entry,
            ctx,
            model,
            cache,
            allocator,
            fixed_steps,
            waiting: VecDeque::new(),
            running: Vec::new(),
            max_num_seqs: options.max_num_seqs,
            max_num_batched_tokens: options.max_num_batched_tokens,
            max_model_len,
            max_items_per_embed: options.max_images_per_prompt.max(1),
            burst_wait: options.burst_wait,
        }
    }

    pub(crate) fn run(&mut self, ready: Receiver<Ready>) {
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
                let deadline = std::time::Instant::now() + self.burst_wait;
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
            // A panic in model code (tch's operators panic on a shape error, say) is this step's error.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()))
                .unwrap_or_else(|panic| Err(Error::Engine(panic_message("the step", panic))));
            if let Err(error) = stepped {
                // A failed step fails the sequences in it; the engine carries on.
                let message = error.to_string();
                for seq in self.running.drain(..) {
                    seq.events.send(Event::Failed(Error::Engine(format!(
                        "model step failed: {message}"
                    ))));
                    self.allocator.release(&mut { seq.blocks });
                }
            }
            self.publish_state();
        }
    }

    /// Drops the sequences whose request was cancelled (or whose receiver went away), freeing their
    /// blocks, so a client that left costs at most the step it left in.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len() + self.running.len();
        let allocator = &mut self.allocator;
        let mut keep = |seq: &mut Sequence| {
            if seq.events.is_cancelled() {
                allocator.release(&mut seq.blocks);
                false
            } else {
                true
            }
        };
        self.waiting.retain_mut(&mut keep);
        self.running.retain_mut(&mut keep);
        let dropped = before - self.waiting.len() - self.running.len();
        self.counters
            .cancelled
            .fetch_add(dropped, Ordering::Relaxed);
    }

    /// Queue depth and KV-cache use, for metrics.
    fn publish_state(&self) {
        let c = &self.counters;
        c.waiting.store(self.waiting.len(), Ordering::Relaxed);
        c.running.store(self.running.len(), Ordering::Relaxed);
        c.kv_blocks_used.store(
            self.allocator.total_blocks() - self.allocator.free_blocks(),
            Ordering::Relaxed,
        );
    }

    fn enqueue(&mut self, ready: Ready) {
        self.waiting.push_back(Sequence {
            sampler: Sampler::new(&ready.params),
            prepared: ready.prepared,
            params: ready.params,
            events: ready.events,
            generated: Vec::new(),
            top_tokens: Vec::new(),
            logprobs: Vec::new(),
            blocks: Vec::new(),
            cached: 0,
        });
    }

    /// Admits waiting sequences that fit, makes room for every decode (preempting the newest sequences
    /// if the pool runs dry; they are recomputed later), and runs one step.
    fn step(&mut self) -> Result<()> {
        self.drop_cancelled();
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
                let error = Error::Engine(format!(
                    "the KV cache ({} blocks) cannot hold a sequence of {} tokens",
                    self.allocator.total_blocks(),
                    seq.len()
                ));
                seq.events.send(Event::Failed(error));
            }
            return Ok(());
        }
        self.forward_and_sample()
    }

    fn forward_and_sample(&mut self) -> Result<()> {
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let decodes_only = self.running.iter().all(|seq| seq.cached > 0);
        let fixed = match &mut self.fixed_steps {
            Some(fixed) if decodes_only => {
                let rows: Vec<DecodeRow> = self
                    .running
                    .iter()
                    .map(|seq| DecodeRow {
                        token: seq.generated.last().copied().unwrap_or_default(),
                        blocks: &seq.blocks,
                        len: seq.len(),
                        position_delta: seq
                            .prepared
                            .processed
                            .positions
                            .as_ref()
                            .map_or(0, |p| p.delta),
                    })
                    .collect();
                fixed.decode(self.model.as_ref(), &mut self.cache, &rows)?
            }
            _ => None,
        };
        let (logits, prefill_tokens, embed_seconds) = match fixed {
            Some(logits) => (logits, 0, 0.0),
            None => self.packed_step(started)?,
        };
        // One host transfer for every greedy row (which also waits for the step to finish).
        let greedy = Vec::<i64>::try_from(logits.f_argmax(-1, false)?.to_device(Device::Cpu))?;
        if let Some(log) = self
            .counters
            .step_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let decodes = self.running.iter().filter(|seq| seq.cached > 0).count();
            log.push(StepTiming {
                prefill_tokens,
                decodes,
                embed_seconds,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let mut finished = Vec::new();
        for (row, seq) in self.running.iter_mut().enumerate() {
            seq.cached = seq.len();
            // A greedy row without top tokens needs nothing but its argmax.
            if seq.params.top_logprobs > 0 {
                seq.top_tokens.push(top_token_ids(
                    &logits.get(row as i64),
                    seq.params.top_logprobs,
                )?);
            }
            let token = if seq.params.is_greedy() {
                greedy[row] as u32
            } else {
                seq.sampler.sample(&logits.get(row as i64))?
            };
            if seq.params.wants_logprobs() {
                let logprobs =
                    token_logprobs(&logits.get(row as i64), token, seq.params.top_logprobs)?;
                seq.logprobs.push(logprobs.clone());
                seq.events.send(Event::Logprobs(logprobs));
            }
            seq.generated.push(token);
            seq.events.send(Event::Token(token));
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
                logprobs: seq.logprobs,
            };
            seq.events.send(Event::Finished(completion));
        }
        self.counters
            .step_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl Scheduler {
    /// A step of any mix of prefills and decodes, packed along one axis: the logits of each sequence's
    /// last token, the number of prompt tokens it prefilled, and (when steps are recorded) the seconds
    /// from `started` until the embeddings were ready.
    fn packed_step(&mut self, started: std::time::Instant) -> Result<(Tensor, usize, f64)> {
        let device = self.model.device();
        // Every decode's last token, embedded in one call (one host-to-device copy for the step).
        let last_tokens: Vec<i64> = self
            .running
            .iter()
            .filter(|seq| seq.cached > 0)
            .map(|seq| seq.generated.last().copied().unwrap_or_default() as i64)
            .collect();
        let decode_embeds = if last_tokens.is_empty() {
            None
        } else {
            Some(
                self.model
                    .embed_tokens(&Tensor::from_slice(&last_tokens).to_device(device))?,
            )
        };
        // Every prefill's prompt (with its images), embedded together.
        let prompts: Vec<PreparedInputs> = self
            .running
            .iter()
            .filter(|seq| seq.cached == 0)
            .map(|seq| seq.prepared.shallow_clone())
            .collect();
        let mut prompt_embeds = embed_prompts(
            self.entry,
            self.model.as_ref(),
            prompts,
            self.max_items_per_embed,
        )?
        .into_iter();
        let mut embeds = Vec::with_capacity(self.running.len());
        let mut layout = Vec::with_capacity(self.running.len());
        let mut decode_row = 0;
        let mut prefill_tokens = 0;
        for seq in &self.running {
            let new_tokens = match &decode_embeds {
                Some(decodes) if seq.cached > 0 => {
                    embeds.push(decodes.narrow(0, decode_row, 1));
                    decode_row += 1;
                    1
                }
                _ => {
                    // Prefill, or recompute after preemption: the prompt (with its images), then what
                    // was generated.
                    let prompt = prompt_embeds
                        .next()
                        .ok_or_else(|| Error::Engine("a prefill lost its embeddings".into()))?;
                    let generated: Vec<i64> = seq.generated.iter().map(|&t| t as i64).collect();
                    if generated.is_empty() {
                        embeds.push(prompt);
                    } else {
                        let more = self
                            .model
                            .embed_tokens(&Tensor::from_slice(&generated).to_device(device))?;
                        embeds.push(Tensor::cat(&[prompt, more.to_kind(self.model.dtype())], 0));
                    }
                    prefill_tokens += seq.len();
                    seq.len()
                }
            };
            layout.push((seq.blocks.as_slice(), seq.len() - new_tokens, new_tokens));
        }
        let embeds = Tensor::cat(&embeds, 0);
        let mut embed_seconds = 0.0;
        if self.counters.time_embeddings.load(Ordering::Relaxed) {
            // Benchmarks only: wait for the embeddings (vision path included) to time them apart.
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            embed_seconds = started.elapsed().as_secs_f64();
        }
        if let (Some(fixed), &[(blocks, 0, _)]) = (&mut self.fixed_steps, layout.as_slice()) {
            // One sequence prefilled alone.
            let positions = self.running[0].prepared.processed.positions.as_ref();
            if let Some(logits) = fixed.prefill(
                self.model.as_ref(),
                &mut self.cache,
                &embeds,
                blocks,
                positions,
            )? {
                return Ok((logits, prefill_tokens, embed_seconds));
            }
        }
        let mut batch = attention_batch(&layout, self.cache.block_size(), true, device)?;
        let positions: Vec<SeqPositions> = self
            .running
            .iter()
            .zip(&layout)
            .map(|(seq, &(_, context, new))| SeqPositions {
                context,
                new,
                prompt: seq.prepared.processed.positions.as_ref(),
            })
            .collect();
        set_positions(
            &mut batch,
            self.model.position_sections(),
            &positions,
            device,
        )?;
        let logits = self
            .model
            .forward(&embeds, &mut Step::new(&batch, &mut self.cache))?;
        Ok((logits, prefill_tokens, embed_seconds))
    }
}

/// What a caught panic said, for an error message: "`what` panicked: …".
pub(crate) fn panic_message(what: &str, panic: Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    // libtorch's errors carry a C++ backtrace after the first line.
    let first = text.lines().next().unwrap_or_default();
    format!("{what} panicked: {first}")
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
