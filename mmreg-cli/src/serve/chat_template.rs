//! Chat templates, found where transformers looks and rendered with minijinja set up as transformers sets
//! up jinja2 (`trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`, a `tojson` that writes
//! like Python's `json.dumps`, Python's string and dict methods through minijinja-contrib's pycompat), so
//! that the prompt is the one `apply_chat_template(messages, add_generation_prompt=True)` gives.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::{json, Map, Value as Json};

use super::openai::{ChatMessage, Content, ContentPart};

/// Where a checkpoint's chat template lives, in the order transformers 5 prefers them.
const SOURCES: &[(&str, Option<&str>)] = &[
    ("chat_template.jinja", None),
    ("chat_template.json", Some("chat_template")),
    ("processor_config.json", Some("chat_template")),
    ("tokenizer_config.json", Some("chat_template")),
];

/// The special tokens transformers passes to a template (`tokenizer.special_tokens_map`).
const SPECIAL_TOKENS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for messages.
    pub source: String,
    /// Whether the template iterates over a message's content parts (then text-only messages are
    /// handed to it as one text part, as vLLM does); otherwise it takes content as a string.
    pub takes_parts: bool,
    special_tokens: Map<String, Json>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The template given on the command line (a file, or the template itself), else the checkpoint's;
    /// `None` if it has none.
    pub fn load(dir: &Path, given: Option<&Path>) -> Result<Option<Self>> {
        let special_tokens = special_tokens(dir)?;
        let found = match given {
            Some(path) => Some(read_given(path)?),
            None => find_in(dir)?,
        };
        found
            .map(|(source, text)| Self::new(&text, source, special_tokens))
            .transpose()
    }

    /// Compiles `text`; `special_tokens` become template variables.
    pub fn new(text: &str, source: String, special_tokens: Map<String, Json>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: String| {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_filter("tojson", python_tojson);
        env.add_template_owned("chat", without_generation_tags(text))
            .with_context(|| format!("chat template from {source}"))?;
        Ok(Self {
            env,
            source,
            takes_parts: iterates_content(text),
            special_tokens,
        })
    }

    /// Renders `messages` (OpenAI-style JSON, image parts already in transformers' `{"type": "image"}`
    /// form) with `extra` variables; errors are the template's (`raise_exception` included).
    pub fn render(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        extra: &Map<String, Json>,
    ) -> Result<String, minijinja::Error> {
        let mut context = self.special_tokens.clone();
        context.insert("messages".into(), Json::Array(messages.to_vec()));
        context.insert("add_generation_prompt".into(), add_generation_prompt.into());
        context.insert("tools".into(), Json::Null);
        context.insert("documents".into(), Json::Null);
        context.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.env
            .get_template("chat")?
            .render(Value::from(minijinja::value::Serde(&context)))
    }

    /// The messages as a template takes them, and the image URLs in order. Image parts become
    /// transformers' `{"type": "image", "url": …}` (as its processors' `apply_chat_template` rewrites
    /// OpenAI's `image_url`); a template that loops over content parts gets text-only content as one text
    /// part (vLLM's "openai" content format), others get strings.
    pub fn messages(&self, messages: &[ChatMessage]) -> Result<(Vec<Json>, Vec<String>), String> {
        let takes_parts = self.takes_parts;
        let mut urls = Vec::new();
        let mut out = Vec::with_capacity(messages.len());
        for message in messages {
            let content = match (&message.content, takes_parts) {
                (None, true) => json!([]),
                (None, false) => json!(""),
                (Some(Content::Text(text)), true) => json!([{ "type": "text", "text": text }]),
                (Some(Content::Text(text)), false) => json!(text),
                (Some(Content::Parts(parts)), true) => Json::Array(
                    parts
                        .iter()
                        .map(|part| match part {
                            ContentPart::Text { text } => json!({ "type": "text", "text": text }),
                            ContentPart::ImageUrl { image_url } => {
                                urls.push(image_url.url().to_owned());
                                json!({ "type": "image", "url": image_url.url() })
                            }
                        })
                        .collect(),
                ),
                (Some(Content::Parts(parts)), false) => {
                    let mut texts = Vec::new();
                    for part in parts {
                        match part {
                            ContentPart::Text { text } => texts.push(text.as_str()),
                            ContentPart::ImageUrl { .. } => {
                                return Err("this model's chat template takes text only; send images through a template that loops over message content (--chat-template) or /v1/completions".into())
                            }
                        }
                    }
                    json!(texts.join("\n"))
                }
            };
            let mut value = serde_json::Map::new();
            value.extend(message.extra.clone());
            value.insert("role".into(), json!(message.role));
            value.insert("content".into(), content);
            out.push(Json::Object(value));
        }
        Ok((out, urls))
    }

    /// The BOS token text, if the tokenizer has one (a prompt that starts with it is tokenized without
    /// special tokens, as HF's processors do).
    pub fn bos_token(&self) -> Option<&str> {
        self.special_tokens.get("bos_token").and_then(Json::as_str)
    }
}

fn read_given(path: &Path) -> Result<(String, String)> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((path.display().to_string(), text)),
        // vLLM also takes the template itself on the command line.
        Err(_)
            if path
                .to_str()
                .is_some_and(|t| t.contains("{{") || t.contains("{%")) =>
        {
            Ok((
                "--chat-template".into(),
                path.to_string_lossy().into_owned(),
            ))
        }
        Err(e) => Err(anyhow!("--chat-template {}: {e}", path.display())),
    }
}

fn find_in(dir: &Path) -> Result<Option<(String, String)>> {
    for &(file, key) in SOURCES {
        let path = dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some(key) = key else {
            return Ok(Some((path.display().to_string(), text)));
        };
        let json: Json = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        if let Some(template) = template_in(&json, key, &path)? {
            return Ok(Some((path.display().to_string(), template)));
        }
    }
    Ok(None)
}

/// `key` as a string, or (tokenizer_config.json's named templates) the entry named `default`.
fn template_in(json: &Json, key: &str, path: &Path) -> Result<Option<String>> {
    match json.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(text)) => Ok(Some(text.clone())),
        Some(Json::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Json::as_str))
            .map(|t| Some(t.to_owned()))
            .ok_or_else(|| anyhow!("{}: no chat template named `default`", path.display())),
        Some(_) => bail!("{}: `{key}` is neither a string nor a list", path.display()),
    }
}

/// bos/eos/… from tokenizer_config.json (else special_tokens_map.json): a string or `{"content": …}`.
fn special_tokens(dir: &Path) -> Result<Map<String, Json>> {
    let mut tokens = Map::new();
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let json: Json = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        for &name in SPECIAL_TOKENS {
            let token = match json.get(name) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(Into::into),
                _ => None,
            };
            if let Some(token) = token {
                tokens.insert(name.into(), token.into());
            }
        }
    }
    Ok(tokens)
}

/// transformers' `{% generation %}…{% endgeneration %}` (marks the assistant's tokens for training masks)
/// renders its body unchanged: an always-true `if` does the same, whitespace control included.
fn without_generation_tags(text: &str) -> String {
    let open = regex::Regex::new(r"\{%(-?)\s*generation\s*(-?)%\}").expect("valid regex");
    let close = regex::Regex::new(r"\{%(-?)\s*endgeneration\s*(-?)%\}").expect("valid regex");
    let text = open.replace_all(text, "{%${1} if true ${2}%}");
    close.replace_all(&text, "{%${1} endif ${2}%}").into_owned()
}

/// Whether the template loops over `message['content']` (or `message.content`), as vLLM detects its
/// "openai" content format.
fn iterates_content(text: &str) -> bool {
    regex::Regex::new(r#"for\s+\w+\s+in\s+\w+(\[\s*['"]content['"]\s*\]|\.content)"#)
        .expect("valid regex")
        .is_match(text)
}

fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=…)`, which unlike
/// minijinja's does not escape HTML characters and separates items with `, ` and `: `.
fn python_tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if sort_keys == Some(true) {
        sort(&mut json);
    }
    let mut out = Vec::new();
    let mut serializer =
        serde_json::Serializer::with_formatter(&mut out, PythonFormatter::new(indent));
    serde::Serialize::serialize(&json, &mut serializer)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(
        String::from_utf8(out).unwrap_or_default(),
    ))
}

fn sort(json: &mut Json) {
    match json {
        Json::Object(map) => {
            let mut entries: Vec<_> = std::mem::take(map).into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (key, mut value) in entries {
                sort(&mut value);
                map.insert(key, value);
            }
        }
        Json::Array(items) => items.iter_mut().for_each(sort),
        _ => {}
    }
}

/// Python's `json.dumps` layout: `, ` and `: ` without an indent; with one, newlines and `indent`
/// spaces per level and `,` at line ends.
struct PythonFormatter {
    indent: Option<usize>,
    depth: usize,
    has_value: bool,
}

impl PythonFormatter {
    fn new(indent: Option<usize>) -> Self {
        Self {
            indent,
            depth: 0,
            has_value: false,
        }
    }

    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(indent) = self.indent {
            w.write_all(b"\n")?;
            w.write_all(" ".repeat(indent * self.depth).as_bytes())?;
        }
        Ok(())
    }

    fn begin<W: ?Sized + std::io::Write>(&mut self, w: &mut W, open: &[u8]) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(open)
    }

    fn end<W: ?Sized + std::io::Write>(&mut self, w: &mut W, close: &[u8]) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(close)
    }

    fn item<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(if self.indent.is_some() { b"," } else { b", " })?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.begin(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.end(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.begin(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.end(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> ChatTemplate {
        let mut special = Map::new();
        special.insert("bos_token".into(), "<s>".into());
        ChatTemplate::new(text, "test".into(), special).expect("compiles")
    }

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let t = template(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ {'b': 1, 'a': [1, 2]} | tojson(sort_keys=true) }}",
        );
        let x = serde_json::json!({"name": "<a&b>", "list": [1, "é"], "empty": {}});
        let mut extra = Map::new();
        extra.insert("x".into(), x);
        let out = t.render(&[], false, &extra).expect("renders");
        // Python: json.dumps(x, ensure_ascii=False), then indent=2, then sort_keys=True.
        assert_eq!(
            out,
            "{\"name\": \"<a&b>\", \"list\": [1, \"é\"], \"empty\": {}}|{\n  \"name\": \"<a&b>\",\n  \"list\": [\n    1,\n    \"é\"\n  ],\n  \"empty\": {}\n}|{\"a\": [1, 2], \"b\": 1}"
        );
    }

    #[test]
    fn generation_tags_render_their_body_and_raise_exception_is_an_error() {
        let t = template(
            "{% for m in messages %}{% generation %}{{ m['content'] | upper }}{% endgeneration %}{% endfor %}{{ bos_token }}",
        );
        let out = t
            .render(
                &[serde_json::json!({"role": "user", "content": "hi"})],
                true,
                &Map::new(),
            )
            .expect("renders");
        assert_eq!(out, "HI<s>");
        let failing =
            template("{{ raise_exception('Only user and assistant roles are supported!') }}");
        let error = failing.render(&[], true, &Map::new()).expect_err("raises");
        assert!(
            error.to_string().contains("Only user and assistant roles"),
            "{error}"
        );
    }

    /// The three hub templates render OpenAI-style conversations as transformers' processors do
    /// (goldens by scripts/make_chat_template_goldens.py).
    #[test]
    fn renders_like_transformers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/chat-templates");
        let goldens: Json =
            serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json")).unwrap())
                .unwrap();
        let special: Map<String, Json> =
            serde_json::from_value(goldens["special_tokens"].clone()).unwrap();
        let templates = goldens["templates"].as_object().expect("templates");
        assert_eq!(templates.len(), 3);
        for (name, cases) in templates {
            let text = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
            let template = ChatTemplate::new(&text, name.clone(), special.clone()).unwrap();
            assert!(template.takes_parts, "{name}");
            for (case, golden) in cases.as_object().expect("cases") {
                let messages: Vec<ChatMessage> =
                    serde_json::from_value(golden["messages"].clone()).unwrap();
                let (messages, urls) = template.messages(&messages).unwrap();
                let add = golden["add_generation_prompt"].as_bool().unwrap();
                let prompt = template.render(&messages, add, &Map::new()).unwrap();
                assert_eq!(prompt, golden["prompt"].as_str().unwrap(), "{name} {case}");
                let images = golden["messages"]
                    .to_string()
                    .matches("image_url\":")
                    .count();
                assert_eq!(urls.len(), images, "{name} {case}");
            }
        }
    }

    #[test]
    fn templates_that_loop_over_content_parts_are_told_apart() {
        assert!(iterates_content(
            "{% for content in message['content'] | selectattr('type') %}"
        ));
        assert!(iterates_content("{%- for part in msg.content %}"));
        assert!(!iterates_content("{{ message['content'] }}"));
    }
}
