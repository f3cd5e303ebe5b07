//! The context passed to every registered function: the checkpoint's configs and tokenizer.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// Typed configs already parsed, keyed by type and file.
type ParsedConfigs = HashMap<(TypeId, &'static str), Arc<dyn Any + Send + Sync>>;

/// Model config (`config.json`), image-processor config (`preprocessor_config.json`, or the
/// `image_processor` of `processor_config.json` as transformers 5 saves it) and tokenizer of one checkpoint.
///
/// Registered functions read typed configs with [`ModelContext::config`], which parses once per type and
/// caches, so an input processor called per request does not re-parse JSON.
pub struct ModelContext {
    dir: Option<PathBuf>,
    config_json: serde_json::Value,
    processor_config_json: serde_json::Value,
    /// The file the processor config came from, for error messages.
    processor_config_file: &'static str,
    tokenizer: Option<Arc<Tokenizer>>,
    parsed: Mutex<ParsedConfigs>,
}

impl std::fmt::Debug for ModelContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelContext")
            .field("dir", &self.dir)
            .field("tokenizer", &self.tokenizer.is_some())
            .finish_non_exhaustive()
    }
}

impl ModelContext {
    /// A context from in-memory configs (tests, `mmreg check` without a checkpoint: `{}` gives HF's defaults).
    pub fn from_json(config: serde_json::Value, processor_config: serde_json::Value) -> Self {
        Self {
            dir: None,
            config_json: config,
            processor_config_json: processor_config,
            processor_config_file: PREPROCESSOR_CONFIG,
            tokenizer: None,
            parsed: Mutex::default(),
        }
    }

    /// Reads `config.json`, `preprocessor_config.json` (optional) and `tokenizer.json` (optional) from a
    /// checkpoint directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::config(
                dir.display().to_string(),
                "not a checkpoint directory",
            ));
        }
        let config = read_json(&dir.join("config.json"))?.ok_or_else(|| {
            Error::config(
                dir.join("config.json").display().to_string(),
                "file not found",
            )
        })?;
        let (processor_config, processor_config_file) = processor_config(dir)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.exists() {
            let tokenizer = Tokenizer::from_file(&tokenizer_path)
                .map_err(|e| Error::config(tokenizer_path.display().to_string(), e))?;
            Some(Arc::new(tokenizer))
        } else {
            None
        };
        Ok(Self {
            dir: Some(dir.to_path_buf()),
            config_json: config,
            processor_config_json: processor_config,
            processor_config_file,
            tokenizer,
            parsed: Mutex::default(),
        })
    }

    pub fn with_tokenizer(mut self, tokenizer: Tokenizer) -> Self {
        self.tokenizer = Some(Arc::new(tokenizer));
        self
    }

    /// The checkpoint directory, if the context came from one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn config_json(&self) -> &serde_json::Value {
        &self.config_json
    }

    pub fn processor_config_json(&self) -> &serde_json::Value {
        &self.processor_config_json
    }

    /// The `architectures` listed in config.json.
    pub fn architectures(&self) -> Vec<String> {
        self.config_json
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_deref().ok_or_else(|| {
            let dir = self
                .dir
                .as_deref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "<no checkpoint>".into());
            Error::config(
                dir,
                "no tokenizer.json: give the prompt as token ids or add a tokenizer",
            )
        })
    }

    /// Another JSON file of the checkpoint (`video_preprocessor_config.json`, say), if the context came
    /// from a directory that has it.
    pub fn json_file(&self, name: &str) -> Result<Option<serde_json::Value>> {
        match &self.dir {
            Some(dir) => read_json(&dir.join(name)),
            None => Ok(None),
        }
    }

    /// config.json parsed as `T` (serde defaults fill missing keys), parsed once and cached.
    pub fn config<T: DeserializeOwned + Send + Sync + 'static>(&self) -> Result<Arc<T>> {
        self.parse_cached(&self.config_json, "config.json")
    }

    /// The image processor's config (preprocessor_config.json, or processor_config.json's
    /// `image_processor`) parsed as `T`, parsed once and cached.
    pub fn processor_config<T: DeserializeOwned + Send + Sync + 'static>(&self) -> Result<Arc<T>> {
        self.parse_cached(&self.processor_config_json, self.processor_config_file)
    }

    fn parse_cached<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
        json: &serde_json::Value,
        file: &'static str,
    ) -> Result<Arc<T>> {
        let key = (TypeId::of::<T>(), file);
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(value) = parsed.get(&key) {
            if let Ok(value) = Arc::clone(value).downcast::<T>() {
                return Ok(value);
            }
        }
        let value: Arc<T> =
            Arc::new(T::deserialize(json).map_err(|e| Error::config(self.file_label(file), e))?);
        parsed.insert(key, value.clone());
        Ok(value)
    }

    fn file_label(&self, file: &str) -> String {
        match &self.dir {
            Some(dir) => dir.join(file).display().to_string(),
            None => file.to_owned(),
        }
    }
}

const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
const PROCESSOR_CONFIG_IMAGE: &str = "processor_config.json (image_processor)";

/// The image processor's settings: preprocessor_config.json (transformers 4.x and the hub), else the
/// `image_processor` object nested in processor_config.json (what transformers 5 `save_pretrained`
/// writes, with no preprocessor_config.json); `null` when neither has one.
fn processor_config(dir: &Path) -> Result<(serde_json::Value, &'static str)> {
    if let Some(json) = read_json(&dir.join(PREPROCESSOR_CONFIG))? {
        return Ok((json, PREPROCESSOR_CONFIG));
    }
    let nested = read_json(&dir.join("processor_config.json"))?
        .and_then(|mut p| p.get_mut("image_processor").map(serde_json::Value::take));
    Ok(match nested {
        Some(json) => (json, PROCESSOR_CONFIG_IMAGE),
        None => (serde_json::Value::Null, PREPROCESSOR_CONFIG),
    })
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::config(path.display().to_string(), format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::config(path.display().to_string(), e)),
    }
}
