//! The scheduler thread: admits prepared requests into the KV cache, runs steps that mix prefills and
//! decodes, samples, streams tokens, and finishes or preempts sequences.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use mmreg_core::registry::ModelEntry;
use mmreg_core::step::AttentionBatch;
use mmreg_core::{
    Collectives, Error, Modality, ModelContext, MultiModalModel, PagedKvCache, PromptPositions,
    Result, Step, TensorMap,
};

use crate::block_pool::{block_hash, BlockPool, Hash};
use crate::blocks::{
    attention_batch, set_bidirectional, set_positions, set_sliding_slots, SeqPositions,
};
use crate::cuda;
use crate::encoder_cache::EncoderCache;
use crate::engine::{
    Completion, EncoderTpMode, EngineCounters, EngineOptions, Event, EventSink, FinishReason,
    Ready, StepTiming, TokenLogprobs,
};
use crate::generate::top_token_ids;
use crate::items::PreparedRequest;
use crate::kernels;
use crate::ranks::{RankState, Ranks};
use crate::sampling::{token_logprobs, Sampler, SamplingParams};
use crate::sliding_pool::SlidingPool;
use crate::step_graphs::{DecodeRow, FixedShapeSteps, StepLogits};

/// A request inside the scheduler.
struct Sequence {
    /// Unique in this scheduler: how a step in flight finds its rows' sequences.
    id: u64,
    request: PreparedRequest,
    params: SamplingParams,
    sampler: Sampler,
    events: EventSink,
    generated: Vec<u32>,
    top_tokens: Vec<Vec<u32>>,
    logprobs: Vec<TokenLogprobs>,
    blocks: Vec<u32>,
    /// Its table in the sliding-window layers' pool, where the model has one (`SlidingPool`).
    sliding_blocks: Vec<u32>,
    /// Tokens whose keys and values are in the cache (computed, or found by prefix caching).
    computed: usize,
    /// The hashes of the sequence's first full blocks, as far as they were needed (prefix caching).
    block_hashes: Vec<Hash>,
    /// The first blocks offered to the pool for reuse (hashed, full and computed).
    registered: usize,
    /// Each item's features while the prompt is prefilled (dropped when it is, or on preemption).
    features: Vec<Option<Tensor>>,
    /// Prompt tokens the prefix cache served when the sequence was first admitted.
    cached_tokens: Option<usize>,
    /// The content hash of each bidirectional run of the prompt (its tokens and items): part of the hash
    /// of every block that overlaps it, since such a block's keys depend on the whole run.
    span_hashes: Vec<Hash>,
}

impl Sequence {
    fn prompt_len(&self) -> usize {
        self.request.prompt_len()
    }

    fn len(&self) -> usize {
        self.prompt_len() + self.generated.len()
    }

    /// Token `i` of the sequence: a prompt token, or a generated one.
    fn token(&self, i: usize) -> u32 {
        let prompt = &self.request.processed.token_ids;
        prompt
            .get(i)
            .copied()
            .unwrap_or_else(|| self.generated[i - prompt.len()])
    }

    /// Its next token is the argmax of its logits, and nothing else of them is wanted.
    fn argmax_only(&self) -> bool {
        self.params.is_greedy() && !self.params.wants_logprobs()
    }

    /// A step of this sequence would be one decode: its last generated token is all that is new.
    fn decoding(&self) -> bool {
        !self.generated.is_empty() && self.computed + 1 == self.len()
    }

    /// Hashes the sequence's first `blocks` full blocks (those not hashed yet).
    fn hash_blocks(&mut self, blocks: usize, block_size: usize) {
        for b in self.block_hashes.len()..blocks {
            let (start, end) = (b * block_size, (b + 1) * block_size);
            let tokens: Vec<u32> = (start..end).map(|i| self.token(i)).collect();
            let spans = &self.request.processed.bidirectional;
            let items: Vec<&Hash> = self
                .request
                .item_hashes(start, end)
                .chain(
                    spans
                        .iter()
                        .zip(&self.span_hashes)
                        .filter(|(run, _)| run.start < end && start < run.end)
                        .map(|(_, hash)| hash),
                )
                .collect();
            let hash = block_hash(self.block_hashes.last(), &tokens, &items);
            self.block_hashes.push(hash);
        }
    }

    fn positions(&self) -> Option<&PromptPositions> {
        self.request.processed.positions.as_ref()
    }

    /// How many tokens from `computed` a step should compute, given `room`: at most `room`, except that
    /// a chunk never ends inside a bidirectional run (it stops before the run, or takes all of it when
    /// the run starts the chunk).
    fn chunk(&self, room: usize) -> usize {
        let start = self.computed;
        let mut end = (start + room).min(self.len());
        loop {
            let inside = self
                .request
                .processed
                .bidirectional
                .iter()
                .find(|run| run.start < end && end < run.end);
            match inside {
                Some(run) if run.start > start => end = run.start,
                Some(run) => end = run.end.min(self.len()),
                None => return end - start,
            }
        }
    }
}

/// The content hash of a prompt's run `run`: its token ids and the hashes of the items in it.
fn span_hash(request: &PreparedRequest, run: &std::ops::Range<usize>) -> Hash {
    let tokens = &request.processed.token_ids
        [run.start.min(request.prompt_len())..run.end.min(request.prompt_len())];
    let items: Vec<&Hash> = request.item_hashes(run.start, run.end).collect();
    block_hash(None, tokens, &items)
}

pub(crate) struct Scheduler {
    counters: Arc<EngineCounters>,
    entry: &'static ModelEntry,
    ctx: Arc<ModelContext>,
    model: Box<dyn MultiModalModel>,
    cache: PagedKvCache,
    pool: BlockPool,
    /// The sliding-window layers' blocks, where the cache keeps them apart.
    sliding: Option<SlidingPool>,
    encoder_cache: EncoderCache,
    /// Decode-only steps and lone prefills in fixed shapes (CUDA graphs on a GPU), where enabled.
    fixed_steps: Option<FixedShapeSteps>,
    /// The other ranks of a tensor-parallel engine (this thread is rank 0).
    ranks: Option<Ranks>,
    /// How a tensor-parallel engine encodes a step's items.
    encoder_mode: EncoderTpMode,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    /// Split a prompt over steps to fill the budget ([`EngineOptions::enable_chunked_prefill`]); off, a
    /// prompt that fits in a step waits for one with room for all of it.
    chunked_prefill: bool,
    max_model_len: usize,
    /// Items per call of a modality's path when a step encodes several: what startup profiling measured
    /// (the most items `--limit-mm-per-prompt` allows).
    max_items_per_embed: usize,
    burst_wait: std::time::Duration,
    /// Issue a decode step before the previous one's tokens are read ([`EngineOptions::async_scheduling`]).
    async_scheduling: bool,
    /// The step issued and not yet landed, with async scheduling.
    in_flight: Option<Flight>,
    /// The id of the newest sequence.
    next_id: u64,
    /// When the last step's tokens were handed out.
    last_landed: Instant,
}

/// One sequence's part of a step: its index in `running` and how many of its tokens the step computes.
#[derive(Debug, Clone, Copy)]
struct Scheduled {
    seq: usize,
    new: usize,
}

/// A step whose forward is queued and whose tokens the host has not read yet.
struct Flight {
    /// Each row's sequence (by id) and how many of its tokens the step computes.
    rows: Vec<(u64, usize)>,
    /// `[rows, vocab]`, valid until the next step is issued: a flight that the next step follows
    /// (`followable`) is landed with its argmax alone.
    logits: Tensor,
    /// Each row's argmax on the device, and its copy on the way to the host (there once `copied` is
    /// reached; `None`: the copy was synchronous).
    greedy: Tensor,
    greedy_host: Tensor,
    copied: Option<cuda::Event>,
    /// Every row decodes one token of a fixed-shape step and needs only its argmax (greedy, no
    /// log-probabilities): the next step may be issued before this one's tokens are read.
    followable: bool,
    started: Instant,
    /// Filled in but for `seconds`, which landing measures.
    timing: StepTiming,
}

impl Scheduler {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        counters: Arc<EngineCounters>,
        entry: &'static ModelEntry,
        ctx: Arc<ModelContext>,
        model: Box<dyn MultiModalModel>,
        cache: PagedKvCache,
        pool: BlockPool,
        sliding: Option<SlidingPool>,
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
            pool,
            sliding,
            encoder_cache: EncoderCache::new(options.encoder_cache_bytes),
            fixed_steps,
            ranks: None,
            encoder_mode: options.mm_encoder_tp_mode,
            waiting: VecDeque::new(),
            running: Vec::new(),
            max_num_seqs: options.max_num_seqs,
            max_num_batched_tokens: options.max_num_batched_tokens.max(1),
            chunked_prefill: options.enable_chunked_prefill,
            max_model_len,
            max_items_per_embed: options.limit_mm_per_prompt.max_count().max(1),
            burst_wait: options.burst_wait,
            // A step in flight needs its tokens copied without waiting: CUDA events (the shim).
            async_scheduling: options.async_scheduling
                && (options.device == Device::Cpu || cuda::events_available()),
            in_flight: None,
            next_id: 0,
            last_landed: Instant::now(),
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
                self.in_flight = None;
                let message = error.to_string();
                for mut seq in std::mem::take(&mut self.running) {
                    seq.events.send(Event::Failed(Error::Engine(format!(
                        "model step failed: {message}"
                    ))));
                    self.release(&mut seq);
                }
            }
            self.publish_state();
        }
    }

    /// Drops the sequences whose request was cancelled (or whose receiver went away), freeing their
    /// blocks, so a client that left costs at most the step it left in.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len() + self.running.len();
        let (pool, sliding) = (&mut self.pool, &mut self.sliding);
        let mut keep = |seq: &mut Sequence| {
            if seq.events.is_cancelled() {
                release(pool, sliding, seq);
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
            self.pool.total_blocks() - self.pool.free_blocks(),
            Ordering::Relaxed,
        );
        if let Some(sliding) = &self.sliding {
            let used = sliding.total_blocks() - sliding.free_blocks();
            c.kv_sliding_blocks_used.store(used, Ordering::Relaxed);
            c.kv_sliding_blocks_peak.fetch_max(used, Ordering::Relaxed);
        }
        c.encoder_cache_bytes
            .store(self.encoder_cache.bytes(), Ordering::Relaxed);
    }

    fn enqueue(&mut self, ready: Ready) {
        self.counters.preprocessing.fetch_sub(1, Ordering::SeqCst);
        let items = ready.prepared.items.len();
        let span_hashes = ready
            .prepared
            .processed
            .bidirectional
            .iter()
            .map(|run| span_hash(&ready.prepared, run))
            .collect();
        self.next_id += 1;
        self.waiting.push_back(Sequence {
            id: self.next_id,
            sampler: Sampler::new(&ready.params),
            request: ready.prepared,
            params: ready.params,
            events: ready.events,
            generated: Vec::new(),
            top_tokens: Vec::new(),
            logprobs: Vec::new(),
            blocks: Vec::new(),
            sliding_blocks: Vec::new(),
            computed: 0,
            block_hashes: Vec::new(),
            registered: 0,
            features: (0..items).map(|_| None).collect(),
            cached_tokens: None,
            span_hashes,
        });
    }

    /// Evicts a sequence from the KV cache; it waits at the front and is recomputed later (what prefix
    /// caching and the encoder cache still hold is reused).
    fn preempt(&mut self, mut victim: Sequence) {
        self.counters.preemptions.fetch_add(1, Ordering::Relaxed);
        self.release(&mut victim);
        victim.computed = 0;
        victim.registered = 0;
        victim.features.iter_mut().for_each(|f| *f = None);
        self.waiting.push_front(victim);
    }

    /// Chooses the step: every running decode, then the running prefills' next chunks, then new
    /// sequences' first chunks, within `max_num_batched_tokens`; each with the blocks its tokens need
    /// (the newest running sequences are preempted when the pool runs dry).
    fn schedule(&mut self) -> Vec<Scheduled> {
        let mut plan = Vec::new();
        let mut budget = self.max_num_batched_tokens;
        'plan: while !self.running.is_empty() {
            plan.clear();
            budget = self.max_num_batched_tokens;
            let (decodes, prefills): (Vec<usize>, Vec<usize>) =
                (0..self.running.len()).partition(|&i| self.running[i].decoding());
            for i in decodes.into_iter().chain(prefills) {
                if budget == 0 {
                    break;
                }
                let seq = &mut self.running[i];
                let new = seq.chunk(budget);
                if !grow(&mut self.pool, &mut self.sliding, seq, new) {
                    let victim = self.running.pop().expect("not empty");
                    self.preempt(victim);
                    continue 'plan;
                }
                budget = budget.saturating_sub(new);
                plan.push(Scheduled { seq: i, new });
            }
            break;
        }
        let block_size = self.pool.block_size();
        while budget > 0 && self.running.len() < self.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            if self.pool.blocks_for(seq.len() + 1) > self.pool.total_blocks() {
                let error = Error::Engine(format!(
                    "the KV cache ({} blocks of {block_size}) cannot hold a sequence of {} tokens",
                    self.pool.total_blocks(),
                    seq.len()
                ));
                let seq = self.waiting.pop_front().expect("front exists");
                seq.events.send(Event::Failed(error));
                continue;
            }
            if let Some(sliding) = &self.sliding {
                let most = sliding.most_held(seq.len() + 1, self.max_num_batched_tokens);
                if most > sliding.total_blocks() {
                    let error = Error::Engine(format!(
                        "the sliding-window layers' KV cache ({} blocks of {block_size}) cannot hold the {most} blocks a sequence of {} tokens needs",
                        sliding.total_blocks(),
                        seq.len()
                    ));
                    let seq = self.waiting.pop_front().expect("front exists");
                    seq.events.send(Event::Failed(error));
                    continue;
                }
            }
            if self.pool.caching() {
                // At least one token is left to compute: its logits are the step's output.
                let full = (seq.len() - 1) / block_size;
                seq.hash_blocks(full, block_size);
                seq.blocks = self.pool.take_prefix(&seq.block_hashes[..full]);
                if let Some(sliding) = &mut self.sliding {
                    // The sliding layers must also hold what the next query sees: the longest hit
                    // whose window the sliding pool still has.
                    let mut hits = seq.blocks.len();
                    let table = loop {
                        match sliding.take_prefix(&seq.block_hashes, hits) {
                            Some(table) => break table,
                            None => hits -= 1,
                        }
                    };
                    let mut unused = seq.blocks.split_off(hits);
                    self.pool.release(&mut unused);
                    seq.sliding_blocks = table;
                }
                seq.computed = seq.blocks.len() * block_size;
                seq.registered = seq.blocks.len();
            }
            // A prompt that does not fit what is left of the step but fits a step of its own goes
            // whole in the next one (the sequences behind it wait with it): without chunked prefill
            // always, with it unless splitting it now lets more waiting prompts finish a step sooner.
            // Only a prompt longer than any step is split either way.
            let left = seq.len() - seq.computed;
            let wait = left > budget
                && left <= self.max_num_batched_tokens
                && !(self.chunked_prefill && self.splitting_pays(budget, left));
            let seq = self.waiting.front_mut().expect("front exists");
            let new = seq.chunk(budget);
            if wait || !grow(&mut self.pool, &mut self.sliding, seq, new) {
                release(&mut self.pool, &mut self.sliding, seq);
                seq.computed = 0;
                seq.registered = 0;
                break;
            }
            if seq.cached_tokens.is_none() {
                seq.cached_tokens = Some(seq.computed.min(seq.prompt_len()));
                let c = &self.counters;
                c.prefix_cache_queries
                    .fetch_add(seq.prompt_len(), Ordering::Relaxed);
                c.prefix_cache_hits
                    .fetch_add(seq.computed.min(seq.prompt_len()), Ordering::Relaxed);
            }
            budget = budget.saturating_sub(new);
            let seq = self.waiting.pop_front().expect("front exists");
            self.running.push(seq);
            plan.push(Scheduled {
                seq: self.running.len() - 1,
                new,
            });
        }
        plan
    }

    /// Whether the first waiting prompt, with `left` tokens to compute (more than the step's `room`),
    /// should be split to fill the step rather than go whole in the next one: only if that lets more
    /// of the waiting prompts finish by the end of the next step. A split costs its second part a
    /// gather of the first part's keys and values and an attention of its own (2-3% of a burst of
    /// LLaVA-NeXT prompts, docs/benchmarks.md, run 130), and buys nothing when the same prompts finish
    /// in the same steps either way.
    fn splitting_pays(&self, room: usize, left: usize) -> bool {
        // The next step's room for prompts: its budget less a token for each sequence running now.
        let next = self
            .max_num_batched_tokens
            .saturating_sub(self.running.len());
        let lengths = std::iter::once(left).chain(self.waiting.iter().skip(1).map(Sequence::len));
        prompts_finishing_sooner_if_split(room, next, lengths)
    }

    /// Schedules and runs one step. With async scheduling, a decode step whose rows need nothing but
    /// their argmax stays in flight: when the next step decodes the same sequences it is issued behind
    /// it, fed that argmax on the device, and the host reads the tokens while it runs ([`Self::follow`]).
    fn step(&mut self) -> Result<()> {
        if let Some(flight) = self.in_flight.take() {
            let next = self.follow(&flight)?;
            self.land(flight)?;
            if next.is_some() {
                self.in_flight = next;
                return Ok(());
            }
        }
        self.drop_cancelled();
        let plan = self.schedule();
        if plan.is_empty() {
            return Ok(());
        }
        let flight = self.issue(&plan)?;
        if self.async_scheduling && flight.followable {
            self.in_flight = Some(flight);
            Ok(())
        } else {
            self.land(flight)
        }
    }

    /// Issues a planned step: its forward, and each row's argmax on its way to the host.
    fn issue(&mut self, plan: &[Scheduled]) -> Result<Flight> {
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let decodes_only = plan.iter().all(|s| self.running[s.seq].decoding());
        let fixed = match &mut self.fixed_steps {
            Some(_) if decodes_only && self.ranks.is_some() => {
                let rows = decode_rows(&self.running, plan);
                // The rows borrow the running sequences; the step needs the scheduler mutably.
                let rows: Vec<OwnedDecodeRow> = rows.iter().map(OwnedDecodeRow::from).collect();
                let rows: Vec<DecodeRow> = rows.iter().map(OwnedDecodeRow::row).collect();
                self.parallel_decode(&rows)?
            }
            Some(fixed) if decodes_only => {
                let rows = decode_rows(&self.running, plan);
                fixed.decode(self.model.as_ref(), &mut self.cache, &rows)?
            }
            _ => None,
        };
        let fixed_shape = fixed.is_some() && self.ranks.is_none();
        let (logits, argmax, prefill_tokens, embed_seconds) = match fixed {
            Some(out) => (out.logits, out.argmax, 0, 0.0),
            None => {
                let (logits, tokens, seconds) = self.packed_step(plan, started)?;
                (logits, None, tokens, seconds)
            }
        };
        let seqs = plan.iter().map(|s| &self.running[s.seq]);
        let timing = StepTiming {
            prefill_tokens,
            decodes: seqs.clone().filter(|seq| seq.decoding()).count(),
            embed_seconds,
            issued_seconds: started.elapsed().as_secs_f64(),
            seconds: 0.0,
            overlapped: false,
        };
        let followable = fixed_shape && seqs.clone().all(Sequence::argmax_only);
        let rows = seqs.zip(plan).map(|(seq, s)| (seq.id, s.new)).collect();
        self.flight(rows, logits, argmax, started, timing, followable)
    }

    /// Issues the next step behind `flight` before the host has read its tokens, where that step would
    /// decode exactly the sequences `flight` decodes (each its next token, in fixed shapes), none of them
    /// cancelled or at its length limit, with nobody waiting who could be admitted. Its input tokens are
    /// `flight`'s argmax, on the device. A sequence that `flight`'s token stops costs one wasted row.
    fn follow(&mut self, flight: &Flight) -> Result<Option<Flight>> {
        if !flight.followable
            || self.running.is_empty()
            || (!self.waiting.is_empty() && self.running.len() < self.max_num_seqs)
        {
            return Ok(None);
        }
        // Each running sequence's row in `flight`.
        let mut from = Vec::with_capacity(self.running.len());
        for seq in &self.running {
            let Some(row) = flight.rows.iter().position(|&(id, _)| id == seq.id) else {
                return Ok(None);
            };
            // `flight`'s token is its last one.
            let last = seq.generated.len() + 1 >= seq.params.max_tokens
                || seq.len() + 1 >= self.max_model_len;
            if !seq.decoding() || last || seq.events.is_cancelled() {
                return Ok(None);
            }
            from.push(row as i64);
        }
        // Room for `flight`'s token and the one this step computes.
        for seq in &mut self.running {
            if !grow(&mut self.pool, &mut self.sliding, seq, 2) {
                return Ok(None);
            }
        }
        let started = Instant::now();
        let Some(fixed) = &mut self.fixed_steps else {
            return Ok(None);
        };
        let rows: Vec<DecodeRow> = self
            .running
            .iter()
            .map(|seq| DecodeRow {
                token: 0,
                blocks: &seq.blocks,
                sliding_blocks: &seq.sliding_blocks,
                len: seq.len() + 1,
                position_delta: seq.positions().map_or(0, |p| p.delta),
            })
            .collect();
        let Some(planned) = fixed.plan_decode(&rows) else {
            return Ok(None);
        };
        let in_order = from.len() == flight.rows.len() && (0..).zip(&from).all(|(i, &r)| i == r);
        let tokens = match in_order {
            true => flight.greedy.shallow_clone(),
            false => {
                let from = cuda::upload(&Tensor::from_slice(&from), self.model.device())?;
                flight.greedy.f_index_select(0, &from)?
            }
        };
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        let out = fixed.replay_decode(
            self.model.as_ref(),
            &mut self.cache,
            &planned,
            Some(&tokens),
        )?;
        let timing = StepTiming {
            prefill_tokens: 0,
            decodes: rows.len(),
            embed_seconds: 0.0,
            issued_seconds: started.elapsed().as_secs_f64(),
            seconds: 0.0,
            overlapped: true,
        };
        let rows = self.running.iter().map(|seq| (seq.id, 1)).collect();
        self.flight(rows, out.logits, out.argmax, started, timing, true)
            .map(Some)
    }

    /// A step in flight: its rows' argmax (computed here unless the step's graph did), copied to the
    /// host without waiting.
    fn flight(
        &self,
        rows: Vec<(u64, usize)>,
        logits: Tensor,
        argmax: Option<Tensor>,
        started: Instant,
        timing: StepTiming,
        followable: bool,
    ) -> Result<Flight> {
        let device = self.model.device();
        let greedy = argmax.unwrap_or_else(|| kernels::argmax(&logits));
        let asynchronous = device == Device::Cpu || cuda::events_available();
        let greedy_host = greedy.f_to_device_(Device::Cpu, Kind::Int64, asynchronous, false)?;
        let copied = if asynchronous {
            match cuda::Event::record(device) {
                Ok(event) => Some(event),
                Err(error) => {
                    // Nothing to wait on but the whole device: correct, only slower.
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| tracing::warn!(%error, "waiting for the device instead"));
                    if let Device::Cuda(i) = device {
                        tch::Cuda::synchronize(i as i64);
                    }
                    None
                }
            }
        } else {
            None
        };
        Ok(Flight {
            rows,
            logits,
            greedy,
            greedy_host,
            copied,
            followable,
            started,
            timing,
        })
    }

    /// Reads a step's tokens (waiting for it) and hands them to their sequences: streams them, offers
    /// full blocks to the prefix cache, and finishes the sequences that stop. Rows whose sequence has
    /// left since the step was issued are dropped.
    fn land(&mut self, flight: Flight) -> Result<()> {
        if let Some(copied) = &flight.copied {
            copied.wait()?;
        }
        let greedy = Vec::<i64>::try_from(&flight.greedy_host)?;
        // The step's time (logged before any request hears of its end): since it was issued, or since
        // the step before landed if it waited behind it.
        let landed = Instant::now();
        let seconds = landed
            .duration_since(flight.started.max(self.last_landed))
            .as_secs_f64();
        self.last_landed = landed;
        if let Some(log) = self
            .counters
            .step_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            log.push(StepTiming {
                seconds,
                ..flight.timing
            });
        }
        self.counters
            .step_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        // A flight that waited behind the next step needs no logits: they are the next step's now.
        let logits = &flight.logits;
        let block_size = self.pool.block_size();
        let mut finished = Vec::new();
        for (row, &(id, new)) in flight.rows.iter().enumerate() {
            let at = match self.running.get(row) {
                Some(seq) if seq.id == id => Some(row),
                _ => self.running.iter().position(|seq| seq.id == id),
            };
            let Some(i) = at else {
                continue;
            };
            let seq = &mut self.running[i];
            seq.computed += new;
            if self.pool.caching() {
                let full = seq.computed / block_size;
                seq.hash_blocks(full, block_size);
                for b in seq.registered..full {
                    self.pool.register(seq.blocks[b], seq.block_hashes[b]);
                    if let Some(sliding) = &mut self.sliding {
                        sliding.register(seq.sliding_blocks[b], seq.block_hashes[b]);
                    }
                }
                seq.registered = seq.registered.max(full);
            }
            if let Some(sliding) = &mut self.sliding {
                // What the next query no longer sees is free for the next step.
                sliding.drop_out_of_sight(&mut seq.sliding_blocks, seq.computed);
            }
            if seq.computed >= seq.prompt_len() && seq.features.iter().any(Option::is_some) {
                seq.features.iter_mut().for_each(|f| *f = None);
            }
            if seq.computed < seq.len() {
                // A chunk of a longer prefill: nothing to sample yet.
                continue;
            }
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
                finished.push((i, reason));
            }
        }
        finished.sort_by_key(|&(i, _)| i);
        for &(i, reason) in finished.iter().rev() {
            let mut seq = self.running.remove(i);
            self.release(&mut seq);
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
                cached_tokens: seq.cached_tokens.unwrap_or(0),
                top_tokens: seq.top_tokens,
                logprobs: seq.logprobs,
            };
            seq.events.send(Event::Finished(completion));
        }
        Ok(())
    }
}

impl Scheduler {
    /// Makes sure every item whose placeholders fall in this step's chunks has its features: from the
    /// sequence (an earlier chunk), the encoder cache, or the modality's path, which runs once per step
    /// over every item missing (at most `max_items_per_embed` per call, where the model's input type can
    /// join them), each distinct item once.
    fn encode_items(&mut self, plan: &[Scheduled]) -> Result<()> {
        // (sequence, item) pairs still without features, by item hash.
        let mut wanted: Vec<(Hash, Vec<(usize, usize)>)> = Vec::new();
        for s in plan {
            let seq = &mut self.running[s.seq];
            let (start, end) = (seq.computed, seq.computed + s.new);
            for (k, item) in seq.request.items.iter().enumerate() {
                if seq.features[k].is_some() || !item.overlaps(start, end) {
                    continue;
                }
                if let Some(features) = self.encoder_cache.get(&item.hash) {
                    self.counters
                        .encoder_cache_hits
                        .fetch_add(1, Ordering::Relaxed);
                    seq.features[k] = Some(features);
                    continue;
                }
                match wanted.iter_mut().find(|(h, _)| *h == item.hash) {
                    Some((_, users)) => users.push((s.seq, k)),
                    None => wanted.push((item.hash, vec![(s.seq, k)])),
                }
            }
        }
        // Each call of a modality's path: the items it encodes (at most `max_items_per_embed`, each
        // distinct item once) and their inputs.
        let mut calls: Vec<EmbedCall> = Vec::new();
        for modality in self.entry.modalities() {
            let missing: Vec<&(Hash, Vec<(usize, usize)>)> = wanted
                .iter()
                .filter(|(_, users)| {
                    let (i, k) = users[0];
                    self.running[i].request.items[k].modality == modality
                })
                .collect();
            for group in missing.chunks(self.max_items_per_embed) {
                let inputs = group
                    .iter()
                    .map(|(_, users)| {
                        let (i, k) = users[0];
                        self.running[i].request.items[k].inputs.shallow_clone()
                    })
                    .collect();
                calls.push(EmbedCall {
                    modality,
                    group: group.iter().map(|&g| g.clone()).collect(),
                    inputs,
                });
            }
        }
        let outputs = self.run_embed_calls(&calls)?;
        for (call, features) in calls.iter().zip(outputs) {
            let (modality, group) = (call.modality, &call.group);
            if features.len() != group.len() {
                return Err(Error::Model(format!(
                    "{}: the {modality} path returned {} feature tensor(s) for {} item(s)",
                    self.entry.id.path,
                    features.len(),
                    group.len()
                )));
            }
            self.counters
                .encoder_cache_misses
                .fetch_add(group.len(), Ordering::Relaxed);
            for ((hash, users), features) in group.iter().zip(features) {
                let (i, k) = users[0];
                let item = &self.running[i].request.items[k];
                let rows = features.size().first().copied().unwrap_or(0) as usize;
                if rows != item.rows.len() {
                    return Err(Error::TokenCountMismatch {
                        model: self.entry.id.path.into(),
                        modality,
                        item: item.item,
                        what: "the model's embedding",
                        actual: rows,
                        expected: item.rows.len(),
                    });
                }
                self.encoder_cache.insert(*hash, &features);
                for &(i, k) in users {
                    self.running[i].features[k] = Some(features.shallow_clone());
                }
            }
        }
        Ok(())
    }

    /// The features of each call's items, in order: on rank 0, or, with a tensor-parallel engine whose
    /// encoder runs data-parallel, call `c` on rank `c mod size` (every rank has the whole tower), its
    /// features moved to rank 0's device.
    fn run_embed_calls(&mut self, calls: &[EmbedCall]) -> Result<Vec<Vec<Tensor>>> {
        let (entry, model) = (self.entry, self.model.as_ref());
        let local = |calls: &[EmbedCall]| -> Result<Vec<Vec<Tensor>>> {
            calls
                .iter()
                .map(|c| embed_call(entry, model, c.modality, c.shallow_inputs()))
                .collect()
        };
        let ranks = match (&mut self.ranks, self.encoder_mode) {
            (Some(ranks), EncoderTpMode::Weights) => {
                // A sharded tower: every rank runs every call (its collectives meet); rank 0's output.
                return ranks.run(
                    |_, _| {
                        let inputs: Vec<(Modality, Vec<TensorMap>)> = calls
                            .iter()
                            .map(|c| (c.modality, c.shallow_inputs()))
                            .collect();
                        Box::new(move |state: &mut RankState| {
                            for (modality, inputs) in inputs {
                                embed_call(entry, state.model.as_ref(), modality, inputs)?;
                            }
                            Ok(())
                        })
                    },
                    || local(calls),
                );
            }
            (Some(ranks), EncoderTpMode::Data) if calls.len() > 1 => ranks,
            _ => return local(calls),
        };
        let size = ranks.size();
        let device = model.device();
        let elsewhere = (0..calls.len()).filter(|c| c % size != 0).count();
        self.counters
            .encoder_calls_on_other_ranks
            .fetch_add(elsewhere, Ordering::Relaxed);
        let done: Arc<Mutex<Vec<Option<Vec<Tensor>>>>> =
            Arc::new(Mutex::new((0..calls.len()).map(|_| None).collect()));
        ranks.run(
            |rank, _| {
                let mine: Vec<(usize, Modality, Vec<TensorMap>)> = calls
                    .iter()
                    .enumerate()
                    .filter(|(c, _)| c % size == rank)
                    .map(|(c, call)| (c, call.modality, call.shallow_inputs()))
                    .collect();
                let done = done.clone();
                Box::new(move |state: &mut RankState| {
                    for (c, modality, inputs) in mine {
                        let features = embed_call(entry, state.model.as_ref(), modality, inputs)?;
                        let features = features.iter().map(|f| f.to_device(device)).collect();
                        done.lock().unwrap_or_else(|e| e.into_inner())[c] = Some(features);
                    }
                    Ok(())
                })
            },
            || {
                for (c, call) in calls.iter().enumerate().filter(|(c, _)| c % size == 0) {
                    let features = embed_call(entry, model, call.modality, call.shallow_inputs())?;
                    done.lock().unwrap_or_else(|e| e.into_inner())[c] = Some(features);
                }
                Ok(())
            },
        )?;
        let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
        done.iter_mut()
            .map(|f| {
                f.take()
                    .ok_or_else(|| Error::Engine("a rank left an item unencoded".into()))
            })
            .collect()
    }

    /// The step's token ids (on the host), and the features of the items whose placeholders fall in a
    /// chunk with the rows they go to.
    fn step_inputs(&mut self, plan: &[Scheduled]) -> Result<StepInputs> {
        self.encode_items(plan)?;
        let device = self.model.device();
        let mut ids = Vec::new();
        let (mut rows, mut features) = (Vec::new(), Vec::new());
        for s in plan {
            let seq = &self.running[s.seq];
            let (start, end) = (seq.computed, seq.computed + s.new);
            let base = ids.len();
            ids.extend((start..end).map(|i| i64::from(seq.token(i))));
            for (item, held) in seq.request.items.iter().zip(&seq.features) {
                if !item.overlaps(start, end) {
                    continue;
                }
                let held = held
                    .as_ref()
                    .ok_or_else(|| Error::Engine("an item lost its features".into()))?;
                let (mut taken, mut at) = (Vec::new(), Vec::new());
                for (k, &p) in item.rows.iter().enumerate() {
                    if (start..end).contains(&p) {
                        taken.push(k as i64);
                        at.push((base + p - start) as i64);
                    }
                }
                if taken.is_empty() {
                    continue;
                }
                let taken = cuda::upload(&Tensor::from_slice(&taken), device)?;
                features.push(held.f_index_select(0, &taken)?);
                rows.extend(at);
            }
        }
        Ok(StepInputs {
            ids: Tensor::from_slice(&ids),
            rows,
            features,
        })
    }

    /// A step of any mix of prefill chunks and decodes, packed along one axis: the logits of each
    /// scheduled sequence's last token, the number of prompt tokens it prefilled, and (when steps are
    /// recorded) the seconds from `started` until the embeddings were ready.
    fn packed_step(
        &mut self,
        plan: &[Scheduled],
        started: std::time::Instant,
    ) -> Result<(Tensor, usize, f64)> {
        let device = self.model.device();
        let inputs = self.step_inputs(plan)?;
        let prefill_tokens = plan
            .iter()
            .filter(|s| !self.running[s.seq].decoding())
            .map(|s| s.new)
            .sum();
        if self.ranks.is_some() {
            let batch = self.step_batch(plan)?;
            let logits = self.parallel_forward(inputs, &batch)?;
            return Ok((logits, prefill_tokens, 0.0));
        }
        let embeds = inputs.embed(self.model.as_ref())?;
        let mut embed_seconds = 0.0;
        if self.counters.time_embeddings.load(Ordering::Relaxed) {
            // Benchmarks only: wait for the embeddings (vision path included) to time them apart.
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            embed_seconds = started.elapsed().as_secs_f64();
        }
        if let (Some(fixed), &[only]) = (&mut self.fixed_steps, plan) {
            let seq = &self.running[only.seq];
            if seq.computed == 0 && seq.request.processed.bidirectional.is_empty() {
                // One causal sequence prefilled alone, from its start.
                if let Some(logits) = fixed.prefill(
                    self.model.as_ref(),
                    &mut self.cache,
                    &embeds,
                    &seq.blocks,
                    &seq.sliding_blocks,
                    seq.positions(),
                )? {
                    return Ok((logits, prefill_tokens, embed_seconds));
                }
            }
        }
        let batch = self.step_batch(plan)?;
        let logits = self
            .model
            .forward(&embeds, &mut Step::new(&batch, &mut self.cache))?;
        Ok((logits, prefill_tokens, embed_seconds))
    }

    /// The step's layout: each sequence's slots in the cache (both pools), its bidirectional runs and
    /// its tokens' positions.
    fn step_batch(&self, plan: &[Scheduled]) -> Result<AttentionBatch> {
        let device = self.model.device();
        let layout: Vec<(&[u32], usize, usize)> = plan
            .iter()
            .map(|s| {
                let seq = &self.running[s.seq];
                (seq.blocks.as_slice(), seq.computed, s.new)
            })
            .collect();
        let mut batch = attention_batch(&layout, self.cache.block_size(), true, device)?;
        let spans: Vec<&[std::ops::Range<usize>]> = plan
            .iter()
            .map(|s| {
                self.running[s.seq]
                    .request
                    .processed
                    .bidirectional
                    .as_slice()
            })
            .collect();
        set_bidirectional(&mut batch, &spans, device)?;
        if let Some(sliding) = &self.sliding {
            let tables: Vec<&[u32]> = plan
                .iter()
                .map(|s| self.running[s.seq].sliding_blocks.as_slice())
                .collect();
            let block_size = self.cache.block_size();
            let (window, pad) = (sliding.window(), sliding.null_slot());
            set_sliding_slots(&mut batch, &tables, block_size, window, pad, device)?;
        }
        let positions: Vec<SeqPositions> = plan
            .iter()
            .map(|s| {
                let seq = &self.running[s.seq];
                SeqPositions {
                    context: seq.computed,
                    new: s.new,
                    prompt: seq.positions(),
                }
            })
            .collect();
        set_positions(
            &mut batch,
            self.model.position_sections(),
            &positions,
            device,
        )?;
        Ok(batch)
    }

    /// A packed step on every tensor-parallel rank: each embeds the step's ids (the vocab-parallel
    /// lookup sums over the group), rank 0 writes the item features over their rows and broadcasts the
    /// result when there are any, and every rank runs the decoder on its shard. Rank 0's logits.
    fn parallel_forward(&mut self, inputs: StepInputs, batch: &AttentionBatch) -> Result<Tensor> {
        let merge = !inputs.rows.is_empty();
        let (model, cache) = (self.model.as_ref(), &mut self.cache);
        let ranks = self
            .ranks
            .as_mut()
            .ok_or_else(|| Error::Engine("no tensor-parallel ranks".into()))?;
        let group = ranks.group().clone();
        let ids = &inputs.ids;
        ranks.run(
            |_, device| {
                let (ids, batch) = (ids.shallow_clone(), batch.to_device(device));
                Box::new(move |state: &mut RankState| {
                    let mut embeds = state
                        .model
                        .embed_tokens(&cuda::upload(&ids, state.device)?)?;
                    if merge {
                        state.group.broadcast(&mut embeds, 0)?;
                    }
                    let cache = state
                        .cache
                        .as_mut()
                        .ok_or_else(|| Error::Engine("a rank has no KV cache".into()))?;
                    state
                        .model
                        .forward(&embeds, &mut Step::new(&batch, cache))
                        .map(|_| ())
                })
            },
            || {
                let mut embeds = inputs.embed(model)?;
                if merge {
                    group.broadcast(&mut embeds, 0)?;
                }
                model.forward(&embeds, &mut Step::new(batch, cache))
            },
        )
    }

    /// A decode step in fixed shapes on every tensor-parallel rank (each replays its own graph).
    fn parallel_decode(&mut self, rows: &[DecodeRow]) -> Result<Option<StepLogits>> {
        let (Some(fixed), Some(ranks)) = (&mut self.fixed_steps, &mut self.ranks) else {
            return Ok(None);
        };
        let Some(planned) = fixed.plan_decode(rows) else {
            return Ok(None);
        };
        let (model, cache) = (self.model.as_ref(), &mut self.cache);
        ranks
            .run(
                |_, _| {
                    let planned = planned.shallow_clone();
                    Box::new(move |state: &mut RankState| {
                        let (Some(fixed), Some(cache)) = (&mut state.fixed, &mut state.cache)
                        else {
                            return Err(Error::Engine(
                                "a rank has no fixed-shape steps or KV cache".into(),
                            ));
                        };
                        fixed
                            .replay_decode(state.model.as_ref(), cache, &planned, None)
                            .map(|_| ())
                    })
                },
                || fixed.replay_decode(model, cache, &planned, None),
            )
            .map(Some)
    }

    /// Hands the scheduler the other ranks of a tensor-parallel engine.
    pub(crate) fn set_ranks(&mut self, ranks: Ranks) {
        self.ranks = Some(ranks);
    }

    pub(crate) fn has_fixed_steps(&self) -> bool {
        self.fixed_steps.is_some()
    }

    /// The sliding-window pool's null slot (the fixed-shape steps' scratch there) and its window, if
    /// there is one.
    pub(crate) fn sliding_null_slot(&self) -> Option<(i64, usize)> {
        self.sliding.as_ref().map(|s| (s.null_slot(), s.window()))
    }
}

impl Scheduler {
    /// Drops a sequence's hold on its blocks in both pools.
    fn release(&mut self, seq: &mut Sequence) {
        release(&mut self.pool, &mut self.sliding, seq);
    }
}

/// Whether, of waiting prompts of `lengths` tokens left (in arrival order), more finish by the end of
/// the next step when the first is split to fill this step's `room` than when it waits and goes whole:
/// split, prompts finish next step while the running total stays within `room + next`; whole, while it
/// stays within `next` (the next step's room for prompts).
fn prompts_finishing_sooner_if_split(
    room: usize,
    next: usize,
    lengths: impl IntoIterator<Item = usize>,
) -> bool {
    let mut total = 0;
    for len in lengths {
        total += len;
        if total > room + next {
            return false;
        }
        if total > next {
            return true;
        }
    }
    false
}

fn release(pool: &mut BlockPool, sliding: &mut Option<SlidingPool>, seq: &mut Sequence) {
    pool.release(&mut seq.blocks);
    if let Some(sliding) = sliding {
        sliding.release(&mut seq.sliding_blocks);
    }
}

/// Gives a sequence the blocks its next `new` tokens need, in both pools (freeing first what its
/// sliding-window layers no longer see); false if a pool is short.
fn grow(
    pool: &mut BlockPool,
    sliding: &mut Option<SlidingPool>,
    seq: &mut Sequence,
    new: usize,
) -> bool {
    let tokens = seq.computed + new;
    pool.grow(&mut seq.blocks, tokens)
        && sliding
            .as_mut()
            .is_none_or(|s| s.grow(&mut seq.sliding_blocks, seq.computed, tokens))
}

/// Each planned sequence's decode row: its last token, blocks and length.
fn decode_rows<'a>(running: &'a [Sequence], plan: &[Scheduled]) -> Vec<DecodeRow<'a>> {
    plan.iter()
        .map(|s| {
            let seq = &running[s.seq];
            DecodeRow {
                token: seq.generated.last().copied().unwrap_or_default(),
                blocks: &seq.blocks,
                sliding_blocks: &seq.sliding_blocks,
                len: seq.len(),
                position_delta: seq.positions().map_or(0, |p| p.delta),
            }
        })
        .collect()
}

/// A decode row that owns its block lists (a step of a tensor-parallel engine borrows the scheduler
/// mutably while it runs).
struct OwnedDecodeRow {
    token: u32,
    blocks: Vec<u32>,
    sliding_blocks: Vec<u32>,
    len: usize,
    position_delta: i64,
}

impl OwnedDecodeRow {
    fn from(row: &DecodeRow) -> Self {
        Self {
            token: row.token,
            blocks: row.blocks.to_vec(),
            sliding_blocks: row.sliding_blocks.to_vec(),
            len: row.len,
            position_delta: row.position_delta,
        }
    }

    fn row(&self) -> DecodeRow<'_> {
        DecodeRow {
            token: self.token,
            blocks: &self.blocks,
            sliding_blocks: &self.sliding_blocks,
            len: self.len,
            position_delta: self.position_delta,
        }
    }
}

/// One call of a modality's path: the items it encodes (by content hash, with the (sequence, item) pairs
/// that wait for each) and their inputs.
struct EmbedCall {
    modality: Modality,
    group: Vec<(Hash, Vec<(usize, usize)>)>,
    inputs: Vec<TensorMap>,
}

impl EmbedCall {
    fn shallow_inputs(&self) -> Vec<TensorMap> {
        self.inputs.iter().map(TensorMap::shallow_clone).collect()
    }
}

/// The features of `inputs` (items of one modality): one call over them joined, where the model's input
/// type can join them, else one call each.
fn embed_call(
    entry: &ModelEntry,
    model: &dyn MultiModalModel,
    modality: Modality,
    inputs: Vec<TensorMap>,
) -> Result<Vec<Tensor>> {
    // Each item's tensors on the device before the path runs, copied without waiting for the stream
    // (from the pinned memory the workers put them in, where there was room), then joined there: a
    // step's second call of a modality's path uploads its pixels while the first call's tower still
    // runs, and joining on the host would first copy them into pageable memory. The metadata the model
    // reads as numbers stays on the host, where reading it makes nobody wait.
    let (host, device) = (entry.host_params(modality)?, model.device());
    let inputs = inputs
        .into_iter()
        .map(|one| one.to_device_except(host, |t| cuda::upload(t, device)))
        .collect::<Result<Vec<_>>>()?;
    if inputs.len() > 1 {
        let parts = inputs.iter().map(TensorMap::shallow_clone).collect();
        if let Some(all) = entry.concat(modality, parts)? {
            // The parts' memory goes back to the allocator before the path runs.
            drop(inputs);
            return entry.embed(model, modality, all);
        }
    }
    let mut features = Vec::with_capacity(inputs.len());
    for one in inputs {
        features.extend(entry.embed(model, modality, one)?);
    }
    Ok(features)
}

/// A step's token ids and the item features written over some of their rows.
struct StepInputs {
    /// `[tokens]`, on the host.
    ids: Tensor,
    rows: Vec<i64>,
    features: Vec<Tensor>,
}

impl StepInputs {
    /// The token embeddings with the features written over their rows.
    fn embed(&self, model: &dyn MultiModalModel) -> Result<Tensor> {
        let device = model.device();
        let mut embeds = model.embed_tokens(&cuda::upload(&self.ids, device)?)?;
        if !self.rows.is_empty() {
            let features = Tensor::f_cat(&self.features, 0)?.to_kind(embeds.kind());
            let rows = cuda::upload(&Tensor::from_slice(&self.rows), device)?;
            let _ = embeds.f_index_copy_(0, &rows, &features)?;
        }
        Ok(embeds)
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

#[cfg(test)]
mod tests {
    use super::prompts_finishing_sooner_if_split as split_pays;

    #[test]
    fn a_split_pays_only_where_a_waiting_prompt_then_finishes_a_step_sooner() {
        // LLaVA-NeXT's burst of eight 2,358-token prompts in 8,192-token steps: after three whole
        // prompts 1,118 tokens are left; split or not, the next step finishes three more.
        assert!(!split_pays(1118, 8189, [2358; 5]));
        assert!(!split_pays(1115, 8186, [2358; 2]));
        // 604-token prompts: after thirteen, 340 tokens are left, and splitting the fourteenth lets the
        // next step finish fourteen prompts instead of thirteen.
        assert!(split_pays(340, 8179, [604; 19]));
        // A prompt longer than the next step's room can only be split.
        assert!(split_pays(99, 99, [100]));
        // Two 60-token prompts behind a running one: split, both finish next step; whole, one.
        assert!(split_pays(40, 99, [60, 60]));
        assert!(!split_pays(40, 99, [60]));
        // Nothing waiting past the one that fits the next step: nothing gained.
        assert!(!split_pays(20, 98, [40, 40]));
    }
}
