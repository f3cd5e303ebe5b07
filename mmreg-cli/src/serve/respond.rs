//! A request through the engine to its HTTP answer: one JSON body, or server-sent events as OpenAI
//! sends them (a chunk per token, the finish reason, optionally the usage, then `data: [DONE]`).
//! Dropping the answer (the client went away) cancels the request in the engine.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mmreg_engine::{Canceller, Completion, Event, FinishReason, Request, TokenLogprobs};
use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::detokenize::Detokenizer;
use super::error::{ApiError, ApiResult};
use super::metrics::{InFlight, OutcomeLabel};
use super::openai::{ChatLogprob, CompletionLogprobs, TopLogprob, Usage};
use super::AppState;

/// Which API answers: the shape of its bodies and chunks.
#[derive(Debug, Clone, Copy)]
pub enum Api {
    Chat,
    Completions,
}

/// What the answer includes besides the text.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub api: Api,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    pub return_token_ids: bool,
}

/// A request in the engine: its events, and its cancellation when this is dropped unfinished.
struct Submission {
    events: UnboundedReceiver<Event>,
    canceller: Canceller,
    started: Instant,
    first_token: Option<Instant>,
    state: Arc<AppState>,
    /// Whether the outcome is counted (else, on drop, the client went away).
    counted: bool,
    _in_flight: InFlight,
}

impl Drop for Submission {
    fn drop(&mut self) {
        // A finished request ignores this; an unfinished one is dropped by the scheduler.
        self.canceller.cancel();
        if !self.counted {
            let outcome = OutcomeLabel {
                outcome: "cancelled",
            };
            self.state.metrics.finished.get_or_create(&outcome).inc();
        }
    }
}

impl Submission {
    async fn next(&mut self) -> Option<Event> {
        let event = self.events.recv().await;
        if matches!(event, Some(Event::Token(_))) && self.first_token.is_none() {
            self.first_token = Some(Instant::now());
            self.state
                .metrics
                .time_to_first_token
                .observe(self.started.elapsed().as_secs_f64());
        }
        event
    }

    /// Counts the outcome (and the tokens of a completion).
    fn record(&mut self, outcome: &'static str, completion: Option<&Completion>) {
        self.counted = true;
        let metrics = &self.state.metrics;
        metrics
            .finished
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        if let Some(c) = completion {
            metrics.prompt_tokens.inc_by(c.prompt_tokens as u64);
            metrics.generation_tokens.inc_by(c.token_ids.len() as u64);
            metrics
                .request_latency
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

/// Submits `request` and answers it as `answer` says.
pub async fn run(
    state: Arc<AppState>,
    request: Request,
    answer: Answer,
    in_flight: InFlight,
) -> ApiResult<Response> {
    let stop = request.params.stop.clone();
    let (tx, events) = unbounded_channel();
    let canceller = state
        .engine
        .submit_with(request, move |event| tx.send(event).is_ok());
    let mut submission = Submission {
        events,
        canceller,
        started: Instant::now(),
        first_token: None,
        state: state.clone(),
        counted: false,
        _in_flight: in_flight,
    };
    // Wait for the first event before answering, so that a request the engine refuses (a bad image,
    // an over-long prompt) gets its status code rather than an error inside a stream.
    let first = match submission.next().await {
        // The route counts the errors it answers.
        Some(Event::Failed(error)) => {
            submission.counted = true;
            return Err(error.into());
        }
        Some(event) => event,
        None => {
            submission.counted = true;
            return Err(engine_stopped());
        }
    };
    if answer.stream {
        Ok(stream(submission, first, answer, &stop))
    } else {
        Ok(Json(collect(submission, first, answer).await?).into_response())
    }
}

fn engine_stopped() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "the engine stopped before the request finished",
    )
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(api: Api) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let prefix = match api {
        Api::Chat => "chatcmpl",
        Api::Completions => "cmpl",
    };
    format!("{prefix}-{:x}{n:06x}", now())
}

/// A token's text for logprobs (special tokens included).
fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

fn chat_logprob(tokenizer: &Tokenizer, lp: &TokenLogprobs) -> ChatLogprob {
    let top = |&(id, logprob): &(u32, f32)| {
        let token = token_text(tokenizer, id);
        TopLogprob {
            bytes: token.clone().into_bytes(),
            token,
            logprob,
        }
    };
    let token = token_text(tokenizer, lp.token);
    ChatLogprob {
        bytes: token.clone().into_bytes(),
        token,
        logprob: lp.logprob,
        top_logprobs: lp.top.iter().map(top).collect(),
    }
}

/// The legacy completions' logprobs; `offset` is where the first token's text starts.
fn completion_logprobs(
    tokenizer: &Tokenizer,
    logprobs: &[TokenLogprobs],
    mut offset: usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for lp in logprobs {
        let token = token_text(tokenizer, lp.token);
        out.text_offset.push(offset);
        offset += token.len();
        out.tokens.push(token);
        out.token_logprobs.push(lp.logprob);
        let top: Map<String, Value> = lp
            .top
            .iter()
            .map(|&(id, logprob)| (token_text(tokenizer, id), json!(logprob)))
            .collect();
        out.top_logprobs.push(top);
    }
    out
}

fn logprobs_json(
    tokenizer: &Tokenizer,
    api: Api,
    logprobs: &[TokenLogprobs],
    offset: usize,
) -> Value {
    match api {
        Api::Chat => {
            let content: Vec<ChatLogprob> = logprobs
                .iter()
                .map(|lp| chat_logprob(tokenizer, lp))
                .collect();
            json!({ "content": content })
        }
        Api::Completions => json!(completion_logprobs(tokenizer, logprobs, offset)),
    }
}

/// The whole answer as one body.
async fn collect(mut submission: Submission, first: Event, answer: Answer) -> ApiResult<Value> {
    let mut next = Some(first);
    let completion = loop {
        match next {
            Some(Event::Finished(completion)) => break completion,
            Some(Event::Failed(error)) => {
                submission.counted = true;
                return Err(error.into());
            }
            Some(Event::Token(_) | Event::Logprobs(_)) => {}
            None => {
                submission.counted = true;
                return Err(engine_stopped());
            }
        }
        next = submission.next().await;
    };
    submission.record(finish_reason(completion.finish_reason), Some(&completion));
    let state = &submission.state;
    let tokenizer = state.engine.context().tokenizer()?;
    let logprobs = answer
        .logprobs
        .then(|| logprobs_json(tokenizer, answer.api, &completion.logprobs, 0));
    let mut choice = match answer.api {
        Api::Chat => json!({
            "index": 0,
            "message": { "role": "assistant", "content": completion.text },
            "logprobs": logprobs,
            "finish_reason": finish_reason(completion.finish_reason),
        }),
        Api::Completions => json!({
            "index": 0,
            "text": completion.text,
            "logprobs": logprobs,
            "finish_reason": finish_reason(completion.finish_reason),
        }),
    };
    if answer.return_token_ids {
        choice["token_ids"] = json!(completion.token_ids);
    }
    Ok(json!({
        "id": request_id(answer.api),
        "object": match answer.api { Api::Chat => "chat.completion", Api::Completions => "text_completion" },
        "created": now(),
        "model": state.model_name,
        "choices": [choice],
        "usage": Usage::new(&completion),
    }))
}

/// The stream's state between events.
struct Streaming {
    submission: Submission,
    first: Option<Event>,
    answer: Answer,
    id: String,
    created: u64,
    detokenizer: Detokenizer,
    /// Token ids and logprobs not yet sent.
    pending_ids: Vec<u32>,
    pending_logprobs: Vec<TokenLogprobs>,
    /// Bytes of text sent (the legacy logprobs' text offsets).
    sent_bytes: usize,
    out: VecDeque<String>,
    done: bool,
}

/// Server-sent events: a chunk per token, the finish, the usage if asked, `[DONE]`.
fn stream(submission: Submission, first: Event, answer: Answer, stop: &[String]) -> Response {
    let mut streaming = Streaming {
        id: request_id(answer.api),
        created: now(),
        submission,
        first: Some(first),
        answer,
        detokenizer: Detokenizer::new(stop),
        pending_ids: Vec::new(),
        pending_logprobs: Vec::new(),
        sent_bytes: 0,
        out: VecDeque::new(),
        done: false,
    };
    if let Api::Chat = answer.api {
        // OpenAI's first chunk names the role.
        let role = json!({ "role": "assistant", "content": "" });
        let chunk = streaming.chunk(role, None, None, None);
        streaming.out.push_back(chunk);
    }
    let events = futures_util::stream::unfold(streaming, |mut s| async move {
        loop {
            if let Some(data) = s.out.pop_front() {
                let event = SseEvent::default().data(data);
                return Some((Ok::<_, std::convert::Infallible>(event), s));
            }
            if s.done {
                return None;
            }
            let event = match s.first.take() {
                Some(event) => Some(event),
                None => s.submission.next().await,
            };
            s.handle(event);
        }
    });
    Sse::new(events).into_response()
}

impl Streaming {
    fn handle(&mut self, event: Option<Event>) {
        let state = self.submission.state.clone();
        let tokenizer = state.engine.context().tokenizer().ok();
        match event {
            Some(Event::Logprobs(lp)) => self.pending_logprobs.push(lp),
            Some(Event::Token(id)) => {
                self.pending_ids.push(id);
                let text = tokenizer
                    .map(|t| self.detokenizer.push(t, id))
                    .unwrap_or_default();
                if !text.is_empty() || !self.pending_logprobs.is_empty() {
                    self.send(tokenizer, text, None);
                }
            }
            Some(Event::Finished(completion)) => {
                let rest = self.detokenizer.finish(&completion.text);
                let reason = finish_reason(completion.finish_reason);
                self.submission.record(reason, Some(&completion));
                self.send(tokenizer, rest, Some(reason));
                if self.answer.include_usage {
                    let usage = Usage::new(&completion);
                    let chunk = self.envelope(json!([]), Some(json!(usage)));
                    self.out.push_back(chunk);
                }
                self.finish();
            }
            Some(Event::Failed(error)) => {
                self.submission.record("error", None);
                self.out.push_back(ApiError::from(error).body().to_string());
                self.finish();
            }
            None => {
                self.out.push_back(engine_stopped().body().to_string());
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        self.out.push_back("[DONE]".into());
        self.done = true;
    }

    /// Queues a chunk with `text` and what is pending (token ids, logprobs), and the finish reason.
    fn send(&mut self, tokenizer: Option<&Tokenizer>, text: String, reason: Option<&str>) {
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        let logprobs = tokenizer
            .filter(|_| self.answer.logprobs)
            .map(|t| logprobs_json(t, self.answer.api, &logprobs, self.sent_bytes));
        self.sent_bytes += text.len();
        let delta = match self.answer.api {
            // The finishing chunk of a chat stream has an empty delta.
            Api::Chat if text.is_empty() && reason.is_some() => json!({}),
            Api::Chat => json!({ "content": text }),
            Api::Completions => json!(text),
        };
        let ids = std::mem::take(&mut self.pending_ids);
        let chunk = self.chunk(delta, logprobs, reason, Some(ids));
        self.out.push_back(chunk);
    }

    /// A chunk of one choice; `ids` are its token ids (sent if the request asked for them).
    fn chunk(
        &self,
        delta: Value,
        logprobs: Option<Value>,
        reason: Option<&str>,
        ids: Option<Vec<u32>>,
    ) -> String {
        let mut choice = match self.answer.api {
            Api::Chat => {
                json!({ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason })
            }
            Api::Completions => {
                json!({ "index": 0, "text": delta, "logprobs": logprobs, "finish_reason": reason })
            }
        };
        if let Some(ids) = ids.filter(|_| self.answer.return_token_ids) {
            choice["token_ids"] = json!(ids);
        }
        let usage = self.answer.include_usage.then_some(Value::Null);
        self.envelope(json!([choice]), usage)
    }

    fn envelope(&self, choices: Value, usage: Option<Value>) -> String {
        let object = match self.answer.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completions => "text_completion",
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.submission.state.model_name,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk.to_string()
    }
}
