//! `GET /metrics`: request and token counters and latencies measured by the server, and the engine's
//! queue depth, KV-cache use and step times read at scrape time, in the Prometheus (OpenMetrics) text
//! format.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use mmreg_engine::EngineCounters;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `stop`, `length`, `error`, `cancelled` (the client went away) or `rejected` (queue full).
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub received: Family<EndpointLabel, Counter>,
    pub finished: Family<OutcomeLabel, Counter>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub time_to_first_token: Histogram,
    pub request_latency: Histogram,
    /// Requests the server has admitted and not yet answered (what the queue bound applies to).
    pub in_flight: AtomicUsize,
    // Read from the engine at scrape time.
    running: Gauge,
    waiting: Gauge,
    kv_blocks_used: Gauge,
    kv_blocks_total: Gauge,
    kv_sliding_blocks_used: Gauge,
    kv_sliding_blocks_total: Gauge,
    kv_usage: Gauge<f64, AtomicU64>,
    in_flight_gauge: Gauge,
    steps: Counter,
    step_seconds: Counter<f64, AtomicU64>,
    cancelled: Counter,
    preemptions: Counter,
    prefix_cache_queries: Counter,
    prefix_cache_hits: Counter,
    encoder_cache_hits: Counter,
    encoder_cache_misses: Counter,
}

/// Latency buckets from 10 ms to ~80 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 14)
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mmreg");
        let received = Family::<EndpointLabel, Counter>::default();
        let finished = Family::<OutcomeLabel, Counter>::default();
        let (prompt_tokens, generation_tokens) = (Counter::default(), Counter::default());
        let time_to_first_token = Histogram::new(latency_buckets());
        let request_latency = Histogram::new(latency_buckets());
        let metrics = Self {
            received,
            finished,
            prompt_tokens,
            generation_tokens,
            time_to_first_token,
            request_latency,
            in_flight: AtomicUsize::new(0),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            kv_sliding_blocks_used: Gauge::default(),
            kv_sliding_blocks_total: Gauge::default(),
            kv_usage: Gauge::default(),
            in_flight_gauge: Gauge::default(),
            steps: Counter::default(),
            step_seconds: Counter::default(),
            cancelled: Counter::default(),
            preemptions: Counter::default(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            encoder_cache_hits: Counter::default(),
            encoder_cache_misses: Counter::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        let r = &mut registry;
        r.register(
            "requests_received",
            "Requests received, by endpoint",
            m.received.clone(),
        );
        r.register(
            "requests_finished",
            "Requests answered, by outcome",
            m.finished.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens processed (after placeholder expansion)",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From request to its first token",
            m.time_to_first_token.clone(),
        );
        r.register(
            "request_latency_seconds",
            "From request to its last token",
            m.request_latency.clone(),
        );
        r.register(
            "requests_in_flight",
            "Requests admitted by the server and not yet answered",
            m.in_flight_gauge.clone(),
        );
        r.register(
            "requests_running",
            "Sequences in the engine's running batch",
            m.running.clone(),
        );
        r.register(
            "requests_waiting",
            "Requests waiting for preprocessing, a sequence slot or KV-cache blocks",
            m.waiting.clone(),
        );
        r.register(
            "kv_cache_blocks_used",
            "KV-cache blocks held by sequences",
            m.kv_blocks_used.clone(),
        );
        r.register(
            "kv_cache_blocks_total",
            "KV-cache blocks in the pool",
            m.kv_blocks_total.clone(),
        );
        r.register(
            "kv_cache_sliding_blocks_used",
            "Blocks of the sliding-window layers' own KV pool held by sequences (0 without one)",
            m.kv_sliding_blocks_used.clone(),
        );
        r.register(
            "kv_cache_sliding_blocks_total",
            "Blocks in the sliding-window layers' own KV pool (0 without one)",
            m.kv_sliding_blocks_total.clone(),
        );
        r.register(
            "kv_cache_usage_ratio",
            "Share of the KV-cache blocks in use",
            m.kv_usage.clone(),
        );
        r.register("engine_steps", "Engine steps run", m.steps.clone());
        r.register(
            "engine_step_seconds",
            "Wall time of all engine steps (with engine_steps: the mean step)",
            m.step_seconds.clone(),
        );
        r.register(
            "engine_requests_cancelled",
            "Requests the engine dropped because their client went away",
            m.cancelled.clone(),
        );
        r.register(
            "engine_preemptions",
            "Sequences evicted from the KV cache to make room",
            m.preemptions.clone(),
        );
        r.register(
            "prefix_cache_queries",
            "Prompt tokens of admitted requests (looked up in the prefix cache)",
            m.prefix_cache_queries.clone(),
        );
        r.register(
            "prefix_cache_hits",
            "Prompt tokens served from the prefix cache",
            m.prefix_cache_hits.clone(),
        );
        r.register(
            "encoder_cache_hits",
            "Multimodal items whose features came from the encoder cache",
            m.encoder_cache_hits.clone(),
        );
        r.register(
            "encoder_cache_misses",
            "Multimodal items run through the vision path",
            m.encoder_cache_misses.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The text exposition, with the engine's state as of now.
    pub fn render(&self, engine: &EngineCounters) -> String {
        let load = |a: &AtomicUsize| a.load(Ordering::Relaxed) as i64;
        self.running.set(load(&engine.running));
        self.waiting
            .set(load(&engine.waiting) + load(&engine.preprocessing));
        let (used, total) = (load(&engine.kv_blocks_used), load(&engine.kv_blocks_total));
        self.kv_blocks_used.set(used);
        self.kv_blocks_total.set(total);
        self.kv_sliding_blocks_used
            .set(load(&engine.kv_sliding_blocks_used));
        self.kv_sliding_blocks_total
            .set(load(&engine.kv_sliding_blocks_total));
        self.kv_usage.set(if total > 0 {
            used as f64 / total as f64
        } else {
            0.0
        });
        self.in_flight_gauge.set(load(&self.in_flight));
        catch_up(&self.steps, engine.steps.load(Ordering::Relaxed) as u64);
        catch_up(
            &self.cancelled,
            engine.cancelled.load(Ordering::Relaxed) as u64,
        );
        catch_up(
            &self.preemptions,
            engine.preemptions.load(Ordering::Relaxed) as u64,
        );
        for (counter, value) in [
            (&self.prefix_cache_queries, &engine.prefix_cache_queries),
            (&self.prefix_cache_hits, &engine.prefix_cache_hits),
            (&self.encoder_cache_hits, &engine.encoder_cache_hits),
            (&self.encoder_cache_misses, &engine.encoder_cache_misses),
        ] {
            catch_up(counter, value.load(Ordering::Relaxed) as u64);
        }
        let seconds = engine.step_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let behind = seconds - self.step_seconds.get();
        if behind > 0.0 {
            self.step_seconds.inc_by(behind);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Brings a counter mirrored from the engine up to the engine's value.
fn catch_up(counter: &Counter, value: u64) {
    let behind = value.saturating_sub(counter.get());
    if behind > 0 {
        counter.inc_by(behind);
    }
}

/// Keeps `in_flight` right however a request ends (answered, failed, or dropped with its client).
pub struct InFlight(Arc<Metrics>);

impl InFlight {
    /// Admits a request unless `limit` are already in flight.
    pub fn admit(metrics: &Arc<Metrics>, limit: usize) -> Option<Self> {
        metrics
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(metrics.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_shows_counters_and_the_engine_state() {
        let metrics = Metrics::new();
        metrics
            .received
            .get_or_create(&EndpointLabel { endpoint: "chat" })
            .inc();
        let engine = EngineCounters::default();
        engine.kv_blocks_total.store(8, Ordering::Relaxed);
        engine.kv_blocks_used.store(2, Ordering::Relaxed);
        engine.kv_sliding_blocks_total.store(5, Ordering::Relaxed);
        engine.kv_sliding_blocks_used.store(3, Ordering::Relaxed);
        engine.step_micros.store(1_500_000, Ordering::Relaxed);
        let text = metrics.render(&engine);
        for line in [
            "mmreg_requests_received_total{endpoint=\"chat\"} 1",
            "mmreg_kv_cache_blocks_used 2",
            "mmreg_kv_cache_usage_ratio 0.25",
            "mmreg_kv_cache_sliding_blocks_used 3",
            "mmreg_kv_cache_sliding_blocks_total 5",
            "mmreg_engine_step_seconds_total 1.5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn in_flight_requests_are_bounded_and_released_on_drop() {
        let metrics = Arc::new(Metrics::new());
        let first = InFlight::admit(&metrics, 2).expect("room");
        let _second = InFlight::admit(&metrics, 2).expect("room");
        assert!(InFlight::admit(&metrics, 2).is_none());
        drop(first);
        assert!(InFlight::admit(&metrics, 2).is_some());
    }
}
