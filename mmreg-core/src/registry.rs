//! The link-time registry: every `#[register_*]` attribute adds one [`Registration`] to a linkme
//! distributed slice; [`Registry`] groups them per model on first use and reports every problem at once.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use tch::Tensor;

use crate::defaults::ModalityDefaults;
use crate::inputs::{DummyRequest, MultiModalData, ProcessedInputs, ProcessorInputs};
use crate::model::{LoadOptions, MultiModalModel};
use crate::weights::Weights;
use crate::{Error, Modality, ModelContext, Result, TensorMap};

pub type LoadFn = fn(&ModelContext, &Weights, &LoadOptions) -> Result<Box<dyn MultiModalModel>>;
pub type MapFn = fn(&ModelContext, &MultiModalData) -> Result<TensorMap>;
pub type EmbedFn = fn(&dyn MultiModalModel, TensorMap) -> Result<Vec<Tensor>>;
pub type ConcatFn = fn(Vec<TensorMap>) -> Result<Option<TensorMap>>;
pub type CountFn = fn(&ModelContext, &MultiModalData) -> Result<Vec<usize>>;
pub type MaxTokensFn = fn(&ModelContext) -> Result<usize>;
pub type DummyDataFn = fn(&ModelContext, &DummyRequest) -> Result<ProcessorInputs>;
pub type InputProcessorFn = fn(&ModelContext, ProcessorInputs) -> Result<ProcessedInputs>;

/// Where a registration was written (the attribute's location).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub file: &'static str,
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// The Rust type a registration belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelId {
    /// The type's name (`Llava`).
    pub name: &'static str,
    /// Its full path (`mmreg_models::llava::Llava`), the grouping key.
    pub path: &'static str,
}

/// One link-time entry, as a registration macro emits it.
#[derive(Debug)]
pub struct Registration {
    pub model: ModelId,
    pub hook: Hook,
    pub location: Location,
}

/// What a registration provides.
#[derive(Debug)]
pub enum Hook {
    /// `#[register_model("Arch", …)]`: the HF `architectures` names and the constructor.
    Model {
        architectures: &'static [&'static str],
        load: LoadFn,
    },
    /// `#[register_input_mapper(modality [= function])]`, with the glue that the model's types tie to it.
    InputMapper {
        modality: Modality,
        /// The user's function, or `None` for the default mapper of the modality.
        function: Option<&'static str>,
        /// The forward parameters the mapper produces and the model takes.
        params: &'static [&'static str],
        /// Those of `params` that stay on the host (`ModalityInputs::HOST`).
        host: &'static [&'static str],
        map: MapFn,
        embed: EmbedFn,
        /// Joins several prompts' mapped inputs (`ModalityInputs::concat`).
        concat: ConcatFn,
        count: CountFn,
        /// Max tokens, dummy data and input processing where the model registers none of its own.
        defaults: ModalityDefaults,
    },
    /// `#[register_max_tokens(modality = function)]`.
    MaxTokens {
        modality: Modality,
        function: &'static str,
        max_tokens: MaxTokensFn,
    },
    /// `#[register_dummy_data(function)]`.
    DummyData {
        function: &'static str,
        dummy_data: DummyDataFn,
    },
    /// `#[register_input_processor(function)]`.
    InputProcessor {
        function: &'static str,
        process: InputProcessorFn,
    },
}

impl Hook {
    /// What this registration is, for listings and errors (`input mapper (image)`).
    pub fn describe(&self) -> String {
        match self {
            Hook::Model { .. } => "model".into(),
            Hook::InputMapper { modality, .. } => format!("input mapper ({modality})"),
            Hook::MaxTokens { modality, .. } => format!("max tokens ({modality})"),
            Hook::DummyData { .. } => "dummy data".into(),
            Hook::InputProcessor { .. } => "input processor".into(),
        }
    }

    /// The registered function's name, as written in the attribute.
    pub fn function(&self) -> String {
        match self {
            Hook::Model { .. } => "LoadModel::load".into(),
            Hook::InputMapper {
                function, modality, ..
            } => function
                .map(str::to_owned)
                .unwrap_or_else(|| format!("default {modality} mapper")),
            Hook::MaxTokens { function, .. }
            | Hook::DummyData { function, .. }
            | Hook::InputProcessor { function, .. } => (*function).to_owned(),
        }
    }
}

#[doc(hidden)]
#[linkme::distributed_slice]
pub static REGISTRATIONS: [Registration];

/// Everything registered for one modality of a model.
#[derive(Debug, Default, Clone)]
pub struct ModalityEntry {
    pub mapper: Option<&'static Registration>,
    pub max_tokens: Option<&'static Registration>,
}

/// Everything registered for one model type.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub id: ModelId,
    pub model: Option<&'static Registration>,
    pub modalities: BTreeMap<Modality, ModalityEntry>,
    pub dummy_data: Option<&'static Registration>,
    pub input_processor: Option<&'static Registration>,
}

/// One line of `mmreg models`: a registration, or the default standing in for an optional one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// `input mapper (image)`, `dummy data`, …
    pub what: String,
    /// The registered function, or `default: …`.
    pub function: String,
    pub location: Location,
}

/// A problem `validate()` found, with every location involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub model: &'static str,
    pub message: String,
    pub locations: Vec<Location>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.model, self.message)?;
        for location in &self.locations {
            write!(f, "\n    at {location}")?;
        }
        Ok(())
    }
}

/// All registrations linked into this binary, grouped per model.
#[derive(Debug)]
pub struct Registry {
    models: Vec<ModelEntry>,
    problems: Vec<Problem>,
}

impl Registry {
    /// The registry of every registration linked into this binary. Remember to link the crates that
    /// register models (`use mmreg_models as _;`): a dependency that code never names is not linked.
    pub fn global() -> &'static Registry {
        static GLOBAL: OnceLock<Registry> = OnceLock::new();
        GLOBAL.get_or_init(|| Registry::from_registrations(&REGISTRATIONS))
    }

    /// Groups registrations per model and records duplicates and gaps.
    pub fn from_registrations(registrations: &'static [Registration]) -> Registry {
        let mut models: Vec<ModelEntry> = Vec::new();
        let mut problems = Vec::new();
        // Link order is unspecified: sort so listings and "first registered" are stable.
        let mut sorted: Vec<&'static Registration> = registrations.iter().collect();
        sorted.sort_by_key(|r| {
            (
                r.model.path,
                r.location.file,
                r.location.line,
                r.location.column,
            )
        });
        for registration in sorted {
            let index = match models
                .iter()
                .position(|m| m.id.path == registration.model.path)
            {
                Some(index) => index,
                None => {
                    models.push(ModelEntry {
                        id: registration.model,
                        model: None,
                        modalities: BTreeMap::new(),
                        dummy_data: None,
                        input_processor: None,
                    });
                    models.len() - 1
                }
            };
            let entry = &mut models[index];
            let slot = match &registration.hook {
                Hook::Model { .. } => &mut entry.model,
                Hook::InputMapper { modality, .. } => {
                    &mut entry.modalities.entry(*modality).or_default().mapper
                }
                Hook::MaxTokens { modality, .. } => {
                    &mut entry.modalities.entry(*modality).or_default().max_tokens
                }
                Hook::DummyData { .. } => &mut entry.dummy_data,
                Hook::InputProcessor { .. } => &mut entry.input_processor,
            };
            match slot {
                Some(first) => problems.push(Problem {
                    model: registration.model.path,
                    message: format!("{} is registered twice", registration.hook.describe()),
                    locations: vec![first.location, registration.location],
                }),
                None => *slot = Some(registration),
            }
        }
        models.sort_by_key(|m| m.id.path);
        problems.extend(architecture_clashes(&models));
        problems.extend(models.iter().flat_map(ModelEntry::gaps));
        Registry { models, problems }
    }

    pub fn models(&self) -> &[ModelEntry] {
        &self.models
    }

    /// Every duplicate and missing registration, each with its source locations.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Fails with every problem if the registrations are inconsistent (run by tests and at engine start).
    pub fn validate(&self) -> Result<()> {
        if self.problems.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = self.problems.iter().map(|p| format!("- {p}")).collect();
        Err(Error::Registry(format!(
            "invalid model registrations:\n{}",
            list.join("\n")
        )))
    }

    /// The model registered under a Hugging Face `architectures` name.
    pub fn by_architecture(&self, architecture: &str) -> Result<&ModelEntry> {
        self.models
            .iter()
            .find(|m| m.architectures().contains(&architecture))
            .ok_or_else(|| {
                Error::Registry(format!(
                    "no model is registered for architecture `{architecture}`; registered: {}",
                    self.architectures().join(", ")
                ))
            })
    }

    /// The model a checkpoint's config.json names in `architectures`.
    pub fn for_context(&self, ctx: &ModelContext) -> Result<&ModelEntry> {
        let architectures = ctx.architectures();
        if architectures.is_empty() {
            return Err(Error::config("config.json", "no `architectures` list"));
        }
        architectures
            .iter()
            .find_map(|a| self.by_architecture(a).ok())
            .ok_or_else(|| {
                Error::Registry(format!(
                    "none of the checkpoint's architectures {architectures:?} is registered; registered: {}",
                    self.architectures().join(", ")
                ))
            })
    }

    /// Looks a model up by architecture, type name or type path (for `mmreg inspect`).
    pub fn find(&self, key: &str) -> Result<&ModelEntry> {
        self.models
            .iter()
            .find(|m| m.id.name == key || m.id.path == key || m.architectures().contains(&key))
            .ok_or_else(|| {
                Error::Registry(format!(
                    "no registered model `{key}`; registered: {}",
                    self.architectures().join(", ")
                ))
            })
    }

    /// Every registered architecture name, sorted.
    pub fn architectures(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self
            .models
            .iter()
            .flat_map(|m| m.architectures().iter().copied())
            .collect();
        names.sort_unstable();
        names
    }
}

fn architecture_clashes(models: &[ModelEntry]) -> Vec<Problem> {
    let mut seen: BTreeMap<&str, &ModelEntry> = BTreeMap::new();
    let mut problems = Vec::new();
    for model in models {
        for &architecture in model.architectures() {
            if let Some(first) = seen.insert(architecture, model) {
                problems.push(Problem {
                    model: model.id.path,
                    message: format!(
                        "architecture `{architecture}` is also registered by {}",
                        first.id.path
                    ),
                    locations: [first, model]
                        .iter()
                        .filter_map(|m| m.model.map(|r| r.location))
                        .collect(),
                });
            }
        }
    }
    problems
}

impl ModelEntry {
    pub fn architectures(&self) -> &'static [&'static str] {
        match self.model.map(|r| &r.hook) {
            Some(Hook::Model { architectures, .. }) => architectures,
            _ => &[],
        }
    }

    /// The modalities this model accepts (those with an input mapper).
    pub fn modalities(&self) -> Vec<Modality> {
        self.modalities
            .iter()
            .filter(|(_, e)| e.mapper.is_some())
            .map(|(m, _)| *m)
            .collect()
    }

    /// Every registration of the model and, where an optional one is absent, the default that stands
    /// in for it (located at the input mapper registration that instantiated it), in a stable order.
    pub fn listing(&self) -> Vec<Listed> {
        let listed = |r: &'static Registration| Listed {
            what: r.hook.describe(),
            function: r.hook.function(),
            location: r.location,
        };
        let default = |what: String, function: &str, at: &'static Registration| Listed {
            what,
            function: format!("default {function}"),
            location: at.location,
        };
        let mut lines: Vec<Listed> = self.model.into_iter().map(listed).collect();
        let mut first_mapper = None;
        for (modality, entry) in &self.modalities {
            lines.extend(entry.mapper.map(listed));
            first_mapper = first_mapper.or(entry.mapper);
            match (entry.max_tokens, entry.mapper) {
                (Some(r), _) => lines.push(listed(r)),
                (None, Some(mapper)) => lines.push(default(
                    format!("max tokens ({modality})"),
                    "(costliest item)",
                    mapper,
                )),
                (None, None) => {}
            }
        }
        match (self.dummy_data, first_mapper) {
            (Some(r), _) => lines.push(listed(r)),
            (None, Some(mapper)) => lines.push(default(
                "dummy data".into(),
                "(costliest items, filler)",
                mapper,
            )),
            (None, None) => {}
        }
        match (self.input_processor, first_mapper) {
            (Some(r), _) => lines.push(listed(r)),
            (None, Some(mapper)) => lines.push(default(
                "input processor".into(),
                "(expand placeholders)",
                mapper,
            )),
            (None, None) => {}
        }
        lines
    }

    /// Every registration of the model, in a stable order, for listings.
    pub fn registrations(&self) -> Vec<&'static Registration> {
        let per_modality = self
            .modalities
            .values()
            .flat_map(|e| [e.mapper, e.max_tokens]);
        [self.model]
            .into_iter()
            .chain(per_modality)
            .chain([self.dummy_data, self.input_processor])
            .flatten()
            .collect()
    }

    fn gaps(&self) -> Vec<Problem> {
        let location: Vec<Location> = self
            .registrations()
            .iter()
            .take(1)
            .map(|r| r.location)
            .collect();
        let problem = |message: String| Problem {
            model: self.id.path,
            message,
            locations: location.clone(),
        };
        let mut problems = Vec::new();
        if self.model.is_none() {
            problems.push(problem(
                "has registrations but no #[register_model(\"Architecture\")]".into(),
            ));
        }
        // Max tokens, dummy data and the input processor are optional: the modality traits give defaults.
        for (modality, entry) in &self.modalities {
            if entry.mapper.is_none() {
                problems.push(problem(format!(
                    "registers max tokens for {modality} but no input mapper for it"
                )));
            }
        }
        problems
    }

    fn missing(&self, what: &str) -> Error {
        Error::Registry(format!("{} registers no {what}", self.id.path))
    }

    /// Builds the model from its checkpoint weights.
    pub fn load(
        &self,
        ctx: &ModelContext,
        weights: &Weights,
        options: &LoadOptions,
    ) -> Result<Box<dyn MultiModalModel>> {
        match self.model.map(|r| &r.hook) {
            Some(Hook::Model { load, .. }) => load(ctx, weights, options),
            _ => Err(self.missing("#[register_model]")),
        }
    }

    pub(crate) fn mapper(&self, modality: Modality) -> Result<&'static Hook> {
        self.modalities
            .get(&modality)
            .and_then(|e| e.mapper)
            .map(|r| &r.hook)
            .ok_or_else(|| self.missing(&format!("input mapper for {modality}")))
    }

    /// The largest number of placeholder tokens one item of `modality` can take: the registered
    /// function, else the count of the modality trait's costliest item.
    pub fn max_tokens(&self, ctx: &ModelContext, modality: Modality) -> Result<usize> {
        match self
            .modalities
            .get(&modality)
            .and_then(|e| e.max_tokens)
            .map(|r| &r.hook)
        {
            Some(Hook::MaxTokens { max_tokens, .. }) => max_tokens(ctx),
            _ => self.default_max_tokens(ctx, modality),
        }
    }

    /// The model's own count of placeholder tokens for each item of `modality` in `data`.
    pub fn item_tokens(
        &self,
        ctx: &ModelContext,
        modality: Modality,
        data: &MultiModalData,
    ) -> Result<Vec<usize>> {
        match self.mapper(modality)? {
            Hook::InputMapper { count, .. } => count(ctx, data),
            _ => unreachable!("mapper slots hold input mappers"),
        }
    }

    /// Maps a prompt's items of `modality` to the forward inputs of the model.
    pub fn map(
        &self,
        ctx: &ModelContext,
        modality: Modality,
        data: &MultiModalData,
    ) -> Result<TensorMap> {
        match self.mapper(modality)? {
            Hook::InputMapper { map, .. } => map(ctx, data),
            _ => unreachable!("mapper slots hold input mappers"),
        }
    }

    /// Runs the model's vision (or other modality) path on the mapper's tensors: one `[tokens, hidden]`
    /// tensor per item. Tensors not yet on the model's device are moved there, except the modality's
    /// [`host_params`](Self::host_params).
    pub fn embed(
        &self,
        model: &dyn MultiModalModel,
        modality: Modality,
        inputs: TensorMap,
    ) -> Result<Vec<Tensor>> {
        match self.mapper(modality)? {
            Hook::InputMapper { embed, host, .. } => {
                let device = model.device();
                embed(
                    model,
                    inputs.to_device_except(host, |t| Ok(t.f_to_device(device)?))?,
                )
            }
            _ => unreachable!("mapper slots hold input mappers"),
        }
    }

    /// The forward parameters of `modality` that stay on the host (`ModalityInputs::HOST`): metadata the
    /// model reads as numbers.
    pub fn host_params(&self, modality: Modality) -> Result<&'static [&'static str]> {
        match self.mapper(modality)? {
            Hook::InputMapper { host, .. } => Ok(host),
            _ => unreachable!("mapper slots hold input mappers"),
        }
    }

    /// Several prompts' mapped inputs of `modality` joined into one (items in order), or `None` if the
    /// model's input type cannot join them.
    pub fn concat(&self, modality: Modality, parts: Vec<TensorMap>) -> Result<Option<TensorMap>> {
        match self.mapper(modality)? {
            Hook::InputMapper { concat, .. } => concat(parts),
            _ => unreachable!("mapper slots hold input mappers"),
        }
    }

    /// The dummy data for profiling: the registered function, else the costliest items of each
    /// modality and filler text.
    pub fn dummy_data(
        &self,
        ctx: &ModelContext,
        request: &DummyRequest,
    ) -> Result<ProcessorInputs> {
        match self.dummy_data.map(|r| &r.hook) {
            Some(Hook::DummyData { dummy_data, .. }) => dummy_data(ctx, request),
            _ => self.default_dummy_data(ctx, request),
        }
    }

    /// Runs the input processor (the registered one, else the default that expands each item's
    /// placeholder token), then checks its placeholders against the model's token counts, so a
    /// disagreement is an error here rather than a crash when the embeddings are merged.
    pub fn process(&self, ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
        let (processed, function) = match self.input_processor.map(|r| &r.hook) {
            Some(Hook::InputProcessor { process, function }) => (process(ctx, inputs)?, *function),
            _ => (
                self.default_process(ctx, inputs)?,
                "default input processor",
            ),
        };
        for range in &processed.placeholders {
            let end = range.offset.checked_add(range.length);
            if end.is_none_or(|end| end > processed.token_ids.len()) {
                return Err(Error::Registry(format!(
                    "{}: input processor `{function}` returned a {} placeholder range {}..{} outside the {}-token prompt",
                    self.id.path,
                    range.modality,
                    range.offset,
                    range.offset.saturating_add(range.length),
                    processed.token_ids.len()
                )));
            }
        }
        if let Some(range) = processed
            .placeholders
            .iter()
            .find(|r| r.is_embed.as_ref().is_some_and(|m| m.len() != r.length))
        {
            return Err(Error::Registry(format!(
                "{}: input processor `{function}` returned a placeholder range of {} tokens ({} item {}) with an is-embedding mask of {}",
                self.id.path,
                range.length,
                range.modality,
                range.item,
                range.is_embed.as_ref().map_or(0, |m| m.len())
            )));
        }
        if let Some(positions) = &processed.positions {
            if positions.sections == 0
                || positions.ids.len() != positions.sections * processed.token_ids.len()
            {
                return Err(Error::Registry(format!(
                    "{}: input processor `{function}` returned {} positions in {} section(s) for a {}-token prompt",
                    self.id.path,
                    positions.ids.len(),
                    positions.sections,
                    processed.token_ids.len()
                )));
            }
        }
        for modality in self.modalities() {
            let expected = self.item_tokens(ctx, modality, &processed.multimodal)?;
            let actual = processed.placeholder_lengths(modality);
            if actual.len() != expected.len() {
                return Err(Error::Registry(format!(
                    "{}: input processor `{function}` marked {} {modality} placeholder range(s) for {} item(s)",
                    self.id.path,
                    actual.len(),
                    expected.len()
                )));
            }
            if let Some((item, (&actual, &expected))) = actual
                .iter()
                .zip(&expected)
                .enumerate()
                .find(|(_, (a, e))| a != e)
            {
                return Err(Error::TokenCountMismatch {
                    model: self.id.path.into(),
                    modality,
                    item,
                    what: "the input processor's placeholder range",
                    actual,
                    expected,
                });
            }
        }
        Ok(processed)
    }
}
