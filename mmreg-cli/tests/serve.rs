//! `mmreg serve` over HTTP: OpenAI's shapes, status codes, the queue bound, the API key, local files,
//! and a graceful stop on SIGTERM. (tests/openai_client.rs drives it with the real `openai` package.)

mod server;

use reqwest::StatusCode;
use serde_json::{json, Value};
use server::{data_url, hf_tokens, repo, Server, IMAGE_A};

fn chat_body(image_url: &str, max_tokens: usize) -> Value {
    json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "What is shown in this image?"}
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": true,
    })
}

async fn post(server: &Server, path: &str, body: &Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .expect("answers");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

/// The error's message, checking OpenAI's error shape and the status.
async fn error(server: &Server, path: &str, body: &Value, status: StatusCode) -> String {
    let (got, json) = post(server, path, body).await;
    assert_eq!(got, status, "{json}");
    assert_eq!(json["error"]["code"], status.as_u16(), "{json}");
    assert!(json["error"]["type"].is_string(), "{json}");
    json["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned()
}

#[tokio::test]
async fn chat_completion_gives_hf_greedy_tokens_with_usage() {
    let server = Server::start(&[]);
    let (status, json) = post(
        &server,
        "/v1/chat/completions",
        &chat_body(&data_url(IMAGE_A), 20),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let ids: Vec<u32> =
        serde_json::from_value(json["choices"][0]["token_ids"].clone()).expect("ids");
    assert_eq!(ids, hf_tokens());
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["model"], "tiny");
    assert_eq!(json["choices"][0]["message"]["role"], "assistant");
    assert_eq!(json["choices"][0]["finish_reason"], "length");
    // The template renders HF's prompt exactly: 595 tokens with the 576 image tokens.
    assert_eq!(json["usage"]["prompt_tokens"], 595);
    assert_eq!(json["usage"]["completion_tokens"], 20);
    assert_eq!(json["usage"]["total_tokens"], 615);
    assert_eq!(json["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // Logprobs: the greedy token is the most likely one.
    let mut body = chat_body(&data_url(IMAGE_A), 2);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    let (_, json) = post(&server, "/v1/chat/completions", &body).await;
    // The same prompt again: every full 16-token block of it but the last token's comes from the prefix
    // cache.
    assert_eq!(
        json["usage"]["prompt_tokens_details"]["cached_tokens"],
        (595 - 1) / 16 * 16
    );
    // /metrics counts the same: prompt tokens looked up and found, and the one image encoded once (the
    // second request's image lies in its cached prefix).
    assert_eq!(
        server.metric("mmreg_prefix_cache_queries_total").await,
        1190.0
    );
    assert_eq!(server.metric("mmreg_prefix_cache_hits_total").await, 592.0);
    assert_eq!(server.metric("mmreg_encoder_cache_misses_total").await, 1.0);
    let content = json["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs");
    assert_eq!(content.len(), 2);
    assert_eq!(content[0]["top_logprobs"][0]["token"], content[0]["token"]);
    assert!(content[0]["logprob"].as_f64().expect("logprob") < 0.0);
}

#[tokio::test]
async fn completions_take_the_models_placeholder_and_images() {
    let server = Server::start(&[]);
    let body = json!({
        "prompt": "USER: <image>\nWhat is shown in this image? ASSISTANT:",
        "images": [data_url(IMAGE_A)],
        "max_tokens": 20, "temperature": 0, "return_token_ids": true, "logprobs": 1,
    });
    let (status, json) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["object"], "text_completion");
    let ids: Vec<u32> =
        serde_json::from_value(json["choices"][0]["token_ids"].clone()).expect("ids");
    assert_eq!(ids, hf_tokens());
    let logprobs = &json["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().map(Vec::len), Some(20));
    assert_eq!(
        logprobs["top_logprobs"][0].as_object().map(|o| o.len()),
        Some(1)
    );
    // Without max_tokens the legacy default is 16.
    let (_, json) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "USER: Hi ASSISTANT:", "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(json["usage"]["completion_tokens"], 16, "{json}");
}

#[tokio::test]
async fn streamed_chunks_join_to_the_whole_answer() {
    let server = Server::start(&[]);
    let (_, whole) = post(
        &server,
        "/v1/chat/completions",
        &chat_body(&data_url(IMAGE_A), 12),
    )
    .await;
    let mut body = chat_body(&data_url(IMAGE_A), 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("the stream");
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        joined,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let ids: Vec<u32> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["token_ids"].as_array())
        .flatten()
        .filter_map(Value::as_u64)
        .map(|id| id as u32)
        .collect();
    assert_eq!(ids, hf_tokens()[..12]);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
}

#[tokio::test]
async fn bad_requests_get_openai_errors_with_the_right_status() {
    let server = Server::start(&["--limit-mm-per-prompt", "image=1", "--max-model-len", "700"]);
    let chat = "/v1/chat/completions";
    let broken = format!("data:image/png;base64,{}", "iVBORw0KGgpub3QgcmVhbGx5");
    let message = error(
        &server,
        chat,
        &chat_body(&broken, 2),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(message.starts_with("image 1: "), "{message}");
    let mut two = chat_body(&data_url(IMAGE_A), 2);
    two["messages"][0]["content"]
        .as_array_mut()
        .expect("parts")
        .push(json!({"type": "image_url", "image_url": {"url": data_url(IMAGE_A)}}));
    let message = error(&server, chat, &two, StatusCode::BAD_REQUEST).await;
    assert!(
        message.contains("2 images given but at most 1"),
        "{message}"
    );
    let long = json!({"prompt": "word ".repeat(800), "max_tokens": 1});
    let message = error(&server, "/v1/completions", &long, StatusCode::BAD_REQUEST).await;
    assert!(
        message.contains("but the model allows at most"),
        "{message}"
    );
    let message = error(
        &server,
        chat,
        &chat_body("http://example.com/a.png", 2),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(message.contains("not an allowed media domain"), "{message}");
    let mut other_model = chat_body(&data_url(IMAGE_A), 2);
    other_model["model"] = json!("gpt-4o");
    error(&server, chat, &other_model, StatusCode::NOT_FOUND).await;
    let mut unsupported = chat_body(&data_url(IMAGE_A), 2);
    unsupported["tools"] = json!([{"type": "function"}]);
    let message = error(&server, chat, &unsupported, StatusCode::BAD_REQUEST).await;
    assert!(message.contains("`tools`"), "{message}");
    let response = reqwest::Client::new()
        .post(server.url(chat))
        .body("{not json")
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Each refused request is counted.
    server
        .wait_for_metric("mmreg_requests_finished_total{outcome=\"error\"}", |v| {
            v == 7.0
        })
        .await;
}

#[tokio::test]
async fn the_api_key_guards_the_v1_routes() {
    let server = Server::start(&["--api-key", "sesame"]);
    let client = reqwest::Client::new();
    let status = |r: reqwest::Response| r.status();
    let without = client
        .get(server.url("/v1/models"))
        .send()
        .await
        .map(status);
    assert_eq!(without.ok(), Some(StatusCode::UNAUTHORIZED));
    let wrong = client
        .get(server.url("/v1/models"))
        .bearer_auth("open")
        .send()
        .await
        .map(status);
    assert_eq!(wrong.ok(), Some(StatusCode::UNAUTHORIZED));
    let models: Value = client
        .get(server.url("/v1/models"))
        .bearer_auth("sesame")
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["max_model_len"], 4096);
    let health = client.get(server.url("/health")).send().await.map(status);
    assert_eq!(health.ok(), Some(StatusCode::OK));
}

/// A long streaming request that holds its place until dropped.
async fn long_stream(server: &Server) -> reqwest::Response {
    let mut body = chat_body(&data_url(IMAGE_A), 3000);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("answers")
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let server = Server::start(&["--max-num-seqs", "1", "--max-waiting-requests", "1"]);
    let running = long_stream(&server).await;
    assert_eq!(running.status(), StatusCode::OK);
    // The second waits for the first's sequence slot: its answer cannot start yet.
    let url = server.url("/v1/chat/completions");
    let mut body = chat_body(&data_url(IMAGE_A), 3000);
    body["stream"] = json!(true);
    let waiting = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .map(|r| r.status())
    });
    server
        .wait_for_metric("mmreg_requests_in_flight", |v| v == 2.0)
        .await;
    let response = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&chat_body(&data_url(IMAGE_A), 2))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let json: Value = response.json().await.expect("json");
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    drop(running);
    waiting.abort();
    server
        .wait_for_metric("mmreg_requests_in_flight", |v| v == 0.0)
        .await;
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_kv_blocks() {
    let server = Server::start(&[]);
    let mut response = long_stream(&server).await;
    let first = response
        .chunk()
        .await
        .expect("reads")
        .expect("a first chunk");
    assert!(first.starts_with(b"data: "));
    // Published after each step: the step that sent the first token may not have published yet.
    server
        .wait_for_metric("mmreg_kv_cache_blocks_used", |v| v > 0.0)
        .await;
    drop(response);
    server
        .wait_for_metric("mmreg_engine_requests_cancelled_total", |v| v == 1.0)
        .await;
    server
        .wait_for_metric("mmreg_kv_cache_blocks_used", |v| v == 0.0)
        .await;
    assert_eq!(
        server
            .metric("mmreg_requests_finished_total{outcome=\"cancelled\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_client_that_gives_up_on_a_whole_answer_cancels_it_too() {
    let server = Server::start(&[]);
    let url = server.url("/v1/completions");
    let body = json!({"prompt": "USER: Hi ASSISTANT:", "max_tokens": 3000, "ignore_eos": true});
    let request =
        tokio::spawn(async move { reqwest::Client::new().post(url).json(&body).send().await });
    server
        .wait_for_metric("mmreg_requests_running", |v| v == 1.0)
        .await;
    // Dropping the client's future closes its connection mid-answer.
    request.abort();
    server
        .wait_for_metric("mmreg_engine_requests_cancelled_total", |v| v == 1.0)
        .await;
    server
        .wait_for_metric("mmreg_kv_cache_blocks_used", |v| v == 0.0)
        .await;
}

#[tokio::test]
async fn local_images_are_served_only_from_the_allowed_directory() {
    let images = repo().join("fixtures/llava-tiny-real/images");
    let server = Server::start(&["--allowed-local-media-path", images.to_str().unwrap()]);
    let inside = format!(
        "file://{}",
        images
            .join("a_300x200.png")
            .canonicalize()
            .unwrap()
            .display()
    );
    let (status, json) = post(&server, "/v1/chat/completions", &chat_body(&inside, 20)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let ids: Vec<u32> = serde_json::from_value(json["choices"][0]["token_ids"].clone()).unwrap();
    assert_eq!(ids, hf_tokens());
    let outside = format!(
        "file://{}",
        repo()
            .join("fixtures/images/tiny_2x4.png")
            .canonicalize()
            .unwrap()
            .display()
    );
    let message = error(
        &server,
        "/v1/chat/completions",
        &chat_body(&outside, 2),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(
        message.contains("outside --allowed-local-media-path"),
        "{message}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_lets_the_running_request_finish_and_stops() {
    let mut server = Server::start(&[]);
    let mut body = chat_body(&data_url(IMAGE_A), 40);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let mut response = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("answers");
    let mut text = String::from_utf8(response.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    while let Some(chunk) = response.chunk().await.expect("the stream goes on") {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    let status = server.child.wait().expect("exits");
    assert!(status.success(), "{status}");
    assert!(
        reqwest::get(server.url("/health")).await.is_err(),
        "still listening"
    );
}

/// `serve --tensor-parallel-size 2`: the decoder split over two Gloo ranks on the CPU answers with
/// HF's greedy tokens.
#[tokio::test]
async fn a_tensor_parallel_server_gives_hf_greedy_tokens() {
    let server = Server::start(&["--tensor-parallel-size", "2"]);
    let (status, json) = post(
        &server,
        "/v1/chat/completions",
        &chat_body(&data_url(IMAGE_A), 20),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let ids: Vec<u32> =
        serde_json::from_value(json["choices"][0]["token_ids"].clone()).expect("ids");
    assert_eq!(ids, hf_tokens());
}
