//! `mmreg serve` driven by the real `openai` Python package (tests/openai_client.py), installed by this
//! test into the per-user cache on first use (`$MMREG_CACHE`, else `$XDG_CACHE_HOME/mmreg`, else
//! `~/.cache/mmreg`, like libtorch), from PyPI with pip. If it cannot be installed the test fails: it
//! never skips.

mod server;

use std::path::{Path, PathBuf};
use std::process::Command;

use server::{hf_tokens, repo, Server, IMAGE_A, MODEL};

/// The version the checks were written against.
const OPENAI: &str = "openai==3.57.0";

fn cache_dir() -> PathBuf {
    mmreg_engine::cache_dir().expect("$HOME")
}

fn run(command: &mut Command) -> bool {
    command.status().is_ok_and(|s| s.success())
}

/// A Python with `openai` importable: the cached virtual environment, made (once) with pip.
fn openai_python() -> PathBuf {
    let venv = cache_dir().join("openai-venv");
    let python = venv.join("bin/python");
    let check = |python: &Path| {
        run(Command::new(python).args([
            "-c",
            &format!(
                "import openai; assert openai.__version__ == '{}'",
                &OPENAI[8..]
            ),
        ]))
    };
    if check(&python) {
        return python;
    }
    // Built beside, then renamed: a concurrent run never sees half an environment.
    let partial = cache_dir().join(format!("openai-venv.{}.partial", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(cache_dir()).expect("the cache directory");
    assert!(
        run(Command::new("python3").args(["-m", "venv"]).arg(&partial)),
        "could not create a Python virtual environment with `python3 -m venv` (python3 with venv is needed)"
    );
    assert!(
        run(Command::new(partial.join("bin/python"))
            .args(["-m", "pip", "install", "--quiet", OPENAI])),
        "could not install {OPENAI} with pip"
    );
    let _ = std::fs::remove_dir_all(&venv);
    std::fs::rename(&partial, &venv).expect("moving the environment in place");
    assert!(
        check(&python),
        "{OPENAI} is not importable from {}",
        python.display()
    );
    python
}

#[test]
fn the_openai_python_client_gets_what_generate_and_hf_give() {
    let python = openai_python();
    // What `mmreg generate --json` says for the chat template's prompt.
    let output = Command::new(env!("CARGO_BIN_EXE_mmreg"))
        .args([
            "generate",
            "--model",
            MODEL,
            "--image",
            IMAGE_A,
            "--json",
            "--max-tokens",
            "20",
        ])
        .args([
            "--prompt",
            "USER: <image>\nWhat is shown in this image? ASSISTANT:",
        ])
        .current_dir(repo())
        .output()
        .expect("mmreg generate runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let generate: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let dir = tempfile::tempdir().expect("temp dir");
    let expected = dir.path().join("expected.json");
    std::fs::write(
        &expected,
        serde_json::json!({
            "repo": repo().canonicalize().expect("repo"),
            "generate": generate,
            "hf_tokens": hf_tokens(),
        })
        .to_string(),
    )
    .expect("write");
    let server = Server::start(&["--allowed-media-domains", "127.0.0.1"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(&server.url)
        .arg(&expected)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
