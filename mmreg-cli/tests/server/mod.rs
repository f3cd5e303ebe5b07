//! A live `mmreg serve` on an ephemeral port for the tests: started with `--port 0`, its address read
//! from the line it prints once it listens, killed when dropped.

#![allow(dead_code)] // each test binary uses part of it

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub const MODEL: &str = "fixtures/llava-tiny-real";
pub const TEMPLATE: &str = "fixtures/chat-templates/llava-1.5.jinja";

pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Server {
    /// `mmreg serve` on the tiny LLaVA with the LLaVA-1.5 chat template, and `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mmreg"))
            .args(["serve", "--model", MODEL, "--chat-template", TEMPLATE])
            .args(["--port", "0", "--served-model-name", "tiny"])
            .args(extra)
            .env("MMREG_LOG", "warn")
            .current_dir(repo())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mmreg serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("mmreg serve: listening on ") {
                        break url.to_owned();
                    }
                }
                _ => {
                    let status = child.wait().expect("exit status");
                    panic!("mmreg serve exited before listening: {status}");
                }
            }
        };
        // Keep reading stdout so that the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, url }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// The value of one metric line (`name` with its labels, as printed).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    /// Polls `/metrics` (bounded) until `name` reaches `value`: the server's state, not a sleep.
    pub async fn wait_for_metric(&self, name: &str, done: impl Fn(f64) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let text = self.metrics().await;
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok());
            if value.is_some_and(&done) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {name}; metrics:\n{text}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fixture file as a base64 `data:` URL.
pub fn data_url(path: &str) -> String {
    use base64::Engine as _;
    let bytes = std::fs::read(repo().join(path)).expect("fixture image");
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

pub const IMAGE_A: &str = "fixtures/llava-tiny-real/images/a_300x200.png";
pub const IMAGE_B: &str = "fixtures/llava-tiny-real/images/b_480x640.png";

/// HF's 20 greedy tokens for "USER: <image>\nWhat is shown in this image? ASSISTANT:" with image A.
pub fn hf_tokens() -> Vec<u32> {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join(MODEL).join("golden.json")).expect("golden"),
    )
    .expect("json");
    serde_json::from_value(golden["cases"]["one_image"]["generated"].clone()).expect("ids")
}
