//! The HTTP routes: OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models` (behind the API
//! key when one is set), `/health` and `/metrics`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mmreg_core::Prompt;
use mmreg_engine::{ImageSource, Request, SamplingParams};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::metrics::{EndpointLabel, InFlight, OutcomeLabel};
use super::openai::{
    refuse_unsupported, ChatCompletionRequest, CompletionRequest, ModelCard, PromptField,
    SamplingFields,
};
use super::respond::{run, Answer, Api};
use super::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
}

async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: HttpRequest,
    next: Next,
) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Compares without stopping at the first difference, so response times do not reveal the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [ModelCard {
            id: state.model_name.clone(),
            object: "model",
            created: state.created,
            owned_by: "mmreg",
            max_model_len: state.max_model_len,
        }],
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(state.engine.counters());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    answer(&state, "chat", chat(state.clone(), body).await)
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    answer(&state, "completions", completion(state.clone(), body).await)
}

/// Counts the request, and its outcome if it is an error (a 503 counts as rejected).
fn answer(state: &AppState, endpoint: &'static str, result: ApiResult<Response>) -> Response {
    let metrics = &state.metrics;
    metrics
        .received
        .get_or_create(&EndpointLabel { endpoint })
        .inc();
    result.unwrap_or_else(|error| {
        let outcome = if error.retry_after.is_some() {
            "rejected"
        } else {
            "error"
        };
        metrics
            .finished
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        error.into_response()
    })
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

fn check_model(state: &AppState, model: Option<&str>) -> ApiResult<()> {
    match model {
        Some(name) if name != state.model_name => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the model `{name}` does not exist (this server has `{}`)",
                state.model_name
            ),
        )
        .param("model")),
        _ => Ok(()),
    }
}

/// Admits a request unless the queue is full (503 with Retry-After).
fn admit(state: &Arc<AppState>) -> ApiResult<InFlight> {
    InFlight::admit(&state.metrics, state.queue_limit).ok_or_else(|| ApiError::overloaded(1))
}

async fn chat(state: Arc<AppState>, body: Bytes) -> ApiResult<Response> {
    let request: ChatCompletionRequest = parse(&body)?;
    check_model(&state, request.model.as_deref())?;
    refuse_unsupported(&request.other)?;
    let template = state.template.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "the model has no chat template: start the server with --chat-template, or use /v1/completions",
        )
    })?;
    let (messages, urls) = template
        .messages(&request.messages)
        .map_err(ApiError::bad_request)?;
    check_image_count(&state, urls.len())?;
    let extra = request.chat_template_kwargs.clone().unwrap_or_default();
    let add_generation_prompt = request.add_generation_prompt.unwrap_or(true);
    let text = template
        .render(&messages, add_generation_prompt, &extra)
        .map_err(|e| ApiError::bad_request(format!("chat template: {e:#}")))?;
    let prompt = chat_prompt_ids(&state, &text, template.bos_token())?;
    let top_logprobs = request.top_logprobs.unwrap_or(0);
    if top_logprobs > 0 && !request.logprobs {
        return Err(
            ApiError::bad_request("`top_logprobs` needs `logprobs: true`").param("top_logprobs"),
        );
    }
    let max_tokens = request
        .max_completion_tokens
        .or(request.sampling.max_tokens);
    let params = sampling_params(
        &state,
        &request.sampling,
        max_tokens,
        request.logprobs,
        top_logprobs,
    )?;
    let in_flight = admit(&state)?;
    let images = fetch_images(&state, &urls).await?;
    let answer = Answer {
        api: Api::Chat,
        stream: request.sampling.stream,
        include_usage: include_usage(&request.sampling),
        logprobs: request.logprobs,
        return_token_ids: request.sampling.return_token_ids,
    };
    run(
        state,
        Request {
            videos: Vec::new(),
            prompt,
            images,
            params,
        },
        answer,
        in_flight,
    )
    .await
}

async fn completion(state: Arc<AppState>, body: Bytes) -> ApiResult<Response> {
    let request: CompletionRequest = parse(&body)?;
    check_model(&state, request.model.as_deref())?;
    refuse_unsupported(&request.other)?;
    let prompt = match request.prompt {
        PromptField::Text(text) => Prompt::Text(text),
        PromptField::TokenIds(ids) => Prompt::TokenIds(ids),
        PromptField::Texts(mut texts) if texts.len() == 1 => Prompt::Text(texts.remove(0)),
        PromptField::Texts(_) => {
            return Err(
                ApiError::bad_request("only one prompt per request is supported").param("prompt"),
            )
        }
    };
    check_image_count(&state, request.images.len())?;
    let top_logprobs = request.logprobs.unwrap_or(0);
    // The legacy API's default is 16 tokens.
    let max_tokens = request.sampling.max_tokens.or(Some(16));
    let params = sampling_params(
        &state,
        &request.sampling,
        max_tokens,
        request.logprobs.is_some(),
        top_logprobs,
    )?;
    let in_flight = admit(&state)?;
    let images = fetch_images(&state, &request.images).await?;
    let answer = Answer {
        api: Api::Completions,
        stream: request.sampling.stream,
        include_usage: include_usage(&request.sampling),
        logprobs: request.logprobs.is_some(),
        return_token_ids: request.sampling.return_token_ids,
    };
    run(
        state,
        Request {
            videos: Vec::new(),
            prompt,
            images,
            params,
        },
        answer,
        in_flight,
    )
    .await
}

fn include_usage(fields: &SamplingFields) -> bool {
    fields.stream
        && fields
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
}

fn check_image_count(state: &AppState, count: usize) -> ApiResult<()> {
    if count > state.max_images {
        return Err(ApiError::bad_request(format!(
            "{count} images given but at most {} are allowed per prompt (--limit-mm-per-prompt)",
            state.max_images
        )));
    }
    Ok(())
}

async fn fetch_images(state: &AppState, urls: &[String]) -> ApiResult<Vec<ImageSource>> {
    let fetches = urls
        .iter()
        .enumerate()
        .map(|(i, url)| state.media.fetch(url, i));
    futures_util::future::try_join_all(fetches).await
}

/// The rendered chat as token ids. As HF's processors do, a prompt that already starts with the BOS
/// token (the template wrote it) is tokenized without special tokens; others with them.
fn chat_prompt_ids(state: &AppState, text: &str, bos: Option<&str>) -> ApiResult<Prompt> {
    let tokenizer = state.engine.context().tokenizer()?;
    let add_special_tokens = !bos.is_some_and(|bos| text.starts_with(bos));
    let encoding = tokenizer
        .encode(text, add_special_tokens)
        .map_err(|e| ApiError::bad_request(format!("tokenizing the prompt: {e}")))?;
    Ok(Prompt::TokenIds(encoding.get_ids().to_vec()))
}

/// The request's sampling over the server's defaults (generation_config.json, then OpenAI's).
fn sampling_params(
    state: &AppState,
    fields: &SamplingFields,
    max_tokens: Option<usize>,
    logprobs: bool,
    top_logprobs: usize,
) -> ApiResult<SamplingParams> {
    let defaults: &SamplingParams = &state.defaults;
    if fields.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported").param("n"));
    }
    let temperature = fields.temperature.unwrap_or(defaults.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request("temperature must be within [0, 2]").param("temperature"));
    }
    let top_p = fields.top_p.unwrap_or(defaults.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request("top_p must be within (0, 1]").param("top_p"));
    }
    if top_logprobs > 20 {
        return Err(ApiError::bad_request("top_logprobs must be at most 20").param("top_logprobs"));
    }
    let max_tokens = max_tokens.unwrap_or(defaults.max_tokens);
    if max_tokens == 0 {
        return Err(ApiError::bad_request("max_tokens must be at least 1").param("max_tokens"));
    }
    let mut stop_token_ids = if fields.ignore_eos {
        Vec::new()
    } else {
        defaults.stop_token_ids.clone()
    };
    stop_token_ids.extend(&fields.stop_token_ids);
    Ok(SamplingParams {
        max_tokens,
        temperature,
        top_p,
        top_k: fields.top_k.unwrap_or(defaults.top_k).max(0),
        seed: fields.seed,
        stop_token_ids,
        stop: fields
            .stop
            .as_ref()
            .map(|s| s.clone().into_vec())
            .unwrap_or_default(),
        top_logprobs,
        logprobs,
    })
}
