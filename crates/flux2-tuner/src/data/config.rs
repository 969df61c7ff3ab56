//! Musubi Tuner's dataset configuration (`dataset/config_utils.py`): a TOML (or JSON) file with a
//! `[general]` table and `[[datasets]]` tables, validated as strictly as Musubi's voluptuous schema
//! (unknown keys and wrong types are errors) and resolved with Musubi's fallback order: the
//! dataset's own table, then `[general]`, then the cache script's `--batch_size`, then the
//! defaults of `BaseDatasetParams` / `ImageDatasetParams`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use toml::map::Map;
use toml::Value;

use crate::error::{Error, Result};
use crate::image_io::{ControlResize, RESOLUTION_STEPS};

/// Musubi's default `resolution` ([W, H]).
pub const DEFAULT_RESOLUTION: (u32, u32) = (960, 544);

/// The value kinds Musubi's schema knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
    Float,
    IntList,
    /// An int N (meaning [N, N]) or a two-element list of ints.
    IntOrPair,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Int => "an integer",
            Kind::Bool => "true or false",
            Kind::Float => "a number",
            Kind::IntList => "a list of integers",
            Kind::IntOrPair => "an integer or a list of two integers [W, H]",
        }
    }
}

/// Keys allowed in `[general]` and in every dataset (`DATASET_ASCENDABLE_SCHEMA`).
const ASCENDABLE: &[(&str, Kind)] = &[
    ("caption_extension", Kind::Str),
    ("batch_size", Kind::Int),
    ("num_repeats", Kind::Int),
    ("resolution", Kind::IntOrPair),
    ("enable_bucket", Kind::Bool),
    ("bucket_no_upscale", Kind::Bool),
];

/// Keys of image datasets only (`IMAGE_DATASET_DISTINCT_SCHEMA`).
const IMAGE_ONLY: &[(&str, Kind)] = &[
    ("image_directory", Kind::Str),
    ("image_jsonl_file", Kind::Str),
    ("cache_directory", Kind::Str),
    ("control_directory", Kind::Str),
    ("multiple_target", Kind::Bool),
    ("fp_latent_window_size", Kind::Int),
    ("fp_1f_clean_indices", Kind::IntList),
    ("fp_1f_target_index", Kind::Int),
    ("fp_1f_no_post", Kind::Bool),
    ("no_resize_control", Kind::Bool),
    ("control_resolution", Kind::IntOrPair),
    // Beyond Musubi (masked loss, see `data::mask`): Musubi's schema refuses these two keys.
    ("alpha_mask", Kind::Bool),
    ("mask_directory", Kind::Str),
];

/// Keys of video datasets only (`VIDEO_DATASET_DISTINCT_SCHEMA`).
const VIDEO_ONLY: &[(&str, Kind)] = &[
    ("video_directory", Kind::Str),
    ("video_jsonl_file", Kind::Str),
    ("control_directory", Kind::Str),
    ("target_frames", Kind::IntList),
    ("frame_extraction", Kind::Str),
    ("frame_stride", Kind::Int),
    ("frame_sample", Kind::Int),
    ("max_frames", Kind::Int),
    ("cache_directory", Kind::Str),
    ("source_fps", Kind::Float),
    ("fp_latent_window_size", Kind::Int),
];

/// Old key names Musubi still reads, renamed on load (`load_user_config`).
const DEPRECATED: &[(&str, &str)] = &[
    ("flux_kontext_no_resize_control", "no_resize_control"),
    ("qwen_image_edit_no_resize_control", "no_resize_control"),
    ("qwen_image_edit_control_resolution", "control_resolution"),
];

/// Where a dataset's items come from.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSource {
    /// `image_directory`: images with caption files beside them.
    ImageDirectory(PathBuf),
    /// `image_jsonl_file`: one JSON object per line with `image_path`, `caption`, `control_path*`.
    ImageJsonl(PathBuf),
    /// `video_directory` / `video_jsonl_file`: valid in Musubi's schema, not trainable on FLUX.2.
    Video(PathBuf),
}

/// One `[[datasets]]` entry with every parameter resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// Position in the file (0-based), for messages.
    pub index: usize,
    pub source: DatasetSource,
    /// Caches go here; defaults to the image directory (required for JSONL datasets).
    pub cache_directory: PathBuf,
    pub control_directory: Option<PathBuf>,
    /// (width, height).
    pub resolution: (u32, u32),
    pub caption_extension: Option<String>,
    pub batch_size: usize,
    pub num_repeats: usize,
    pub enable_bucket: bool,
    /// Forced to false when bucketing is off, as Musubi's `BaseDataset.__init__`.
    pub bucket_no_upscale: bool,
    pub no_resize_control: bool,
    pub control_resolution: Option<(u32, u32)>,
    /// Qwen-Image-Layered only; accepted and refused by the FLUX.2 cache jobs when true.
    pub multiple_target: bool,
    /// Beyond Musubi: cache a loss mask from each image's alpha channel (opaque without one).
    pub alpha_mask: bool,
    /// Beyond Musubi: cache a loss mask from the greyscale image with the image's stem here.
    pub mask_directory: Option<PathBuf>,
}

impl DatasetSpec {
    /// The control-image sizing options of this dataset.
    pub fn control_resize(&self) -> ControlResize {
        ControlResize {
            no_resize_control: self.no_resize_control,
            control_resolution: self.control_resolution,
        }
    }

    /// A short name for messages: `datasets[i]`.
    pub fn name(&self) -> String {
        format!("datasets[{}]", self.index)
    }
}

/// Values from the command line that Musubi lets fill dataset parameters no table sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigFallbacks {
    /// The cache scripts' `--batch_size`.
    pub batch_size: Option<usize>,
}

/// A whole dataset configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetConfig {
    pub path: PathBuf,
    pub datasets: Vec<DatasetSpec>,
}

impl DatasetConfig {
    /// Reads, validates and resolves `path` (`.toml` or `.json`), then checks that every directory
    /// and file it names exists.
    pub fn load(path: &Path, fallbacks: &ConfigFallbacks) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "cannot read the dataset config", e))?;
        let config = Self::parse(&text, path, fallbacks)?;
        config.check_paths()?;
        Ok(config)
    }

    /// Validates and resolves a configuration's text without touching the file system; `path`
    /// names the file in errors and decides the format (`.json`, else TOML).
    pub fn parse(text: &str, path: &Path, fallbacks: &ConfigFallbacks) -> Result<Self> {
        let error = |message: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            message,
        };
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let root = if is_json {
            let json: serde_json::Value =
                serde_json::from_str(text).map_err(|e| error(format!("not valid JSON: {e}")))?;
            json_to_toml(&json, "the file").map_err(error)?
        } else {
            Value::Table(
                toml::from_str::<Map<String, Value>>(text)
                    .map_err(|e| error(format!("not valid TOML: {e}")))?,
            )
        };
        let Value::Table(mut root) = root else {
            return Err(error("the top level must be a table".into()));
        };
        for key in root.keys() {
            if key != "general" && key != "datasets" {
                return Err(error(format!(
                    "unknown top-level key `{key}`; expected only [general] and [[datasets]]"
                )));
            }
        }
        let mut general = match root.remove("general") {
            None => Map::new(),
            Some(Value::Table(table)) => table,
            Some(other) => {
                return Err(error(format!(
                    "`general` must be a table, found {}",
                    other.type_str()
                )))
            }
        };
        rename_deprecated(&mut general);
        check_schema(&general, ASCENDABLE, &[], "[general]").map_err(&error)?;
        let tables = match root.remove("datasets") {
            None => Vec::new(),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(error(format!(
                    "`datasets` must be an array of tables ([[datasets]]), found {}",
                    other.type_str()
                )))
            }
        };
        let mut datasets = Vec::new();
        for (index, table) in tables.into_iter().enumerate() {
            let section = format!("datasets[{index}]");
            let Value::Table(mut table) = table else {
                return Err(error(format!("{section} must be a table")));
            };
            rename_deprecated(&mut table);
            let spec = resolve_dataset(index, &table, &general, fallbacks).map_err(&error)?;
            datasets.push(spec);
        }
        Ok(Self {
            path: path.to_path_buf(),
            datasets,
        })
    }

    /// Checks that the directories and files named by the datasets exist (the cache directory is
    /// created when needed, as Musubi does).
    /// Also checks that no two datasets share a cache directory (Musubi's
    /// `generate_dataset_group_by_blueprint`).
    pub fn check_paths(&self) -> Result<()> {
        let mut seen = HashSet::new();
        for spec in &self.datasets {
            if !seen.insert(spec.cache_directory.clone()) {
                return Err(Error::InvalidConfig {
                    path: self.path.clone(),
                    message: format!(
                        "{}: cache directory {} is used by another dataset; each dataset needs \
                         its own (it defaults to the image directory)",
                        spec.name(),
                        spec.cache_directory.display()
                    ),
                });
            }
        }
        for spec in &self.datasets {
            let (key, path, directory) = match &spec.source {
                DatasetSource::ImageDirectory(p) => ("image_directory", p, true),
                DatasetSource::ImageJsonl(p) => ("image_jsonl_file", p, false),
                DatasetSource::Video(p) => ("video_directory", p, p.is_dir()),
            };
            self.check_path(spec, key, path, directory)?;
            if let Some(control) = &spec.control_directory {
                self.check_path(spec, "control_directory", control, true)?;
            }
            if let Some(masks) = &spec.mask_directory {
                self.check_path(spec, "mask_directory", masks, true)?;
            }
        }
        Ok(())
    }

    fn check_path(
        &self,
        spec: &DatasetSpec,
        key: &str,
        path: &Path,
        directory: bool,
    ) -> Result<()> {
        let ok = if directory {
            path.is_dir()
        } else {
            path.is_file()
        };
        if ok {
            return Ok(());
        }
        let what = if directory { "directory" } else { "file" };
        let found = if path.exists() {
            "exists but is not one"
        } else {
            "does not exist"
        };
        Err(Error::InvalidConfig {
            path: self.path.clone(),
            message: format!(
                "{}: `{key}` = {}: {found} (expected a {what})",
                spec.name(),
                path.display()
            ),
        })
    }
}

fn rename_deprecated(table: &mut Map<String, Value>) {
    for (old, new) in DEPRECATED {
        if let Some(value) = table.remove(*old) {
            // As Musubi: the new key wins when both are present.
            table.entry(new.to_string()).or_insert(value);
        }
    }
}

fn value_kind_ok(value: &Value, kind: Kind) -> bool {
    let is_int = |v: &Value| matches!(v, Value::Integer(_));
    match kind {
        Kind::Str => matches!(value, Value::String(_)),
        Kind::Int => is_int(value),
        Kind::Bool => matches!(value, Value::Boolean(_)),
        Kind::Float => matches!(value, Value::Float(_) | Value::Integer(_)),
        Kind::IntList => matches!(value, Value::Array(items) if items.iter().all(is_int)),
        Kind::IntOrPair => {
            is_int(value)
                || matches!(value, Value::Array(items) if items.len() == 2 && items.iter().all(is_int))
        }
    }
}

/// Unknown keys and wrong types are errors, naming the section and the key.
fn check_schema(
    table: &Map<String, Value>,
    schema: &[(&str, Kind)],
    extra: &[(&str, Kind)],
    section: &str,
) -> std::result::Result<(), String> {
    for (key, value) in table {
        let Some((_, kind)) = schema.iter().chain(extra).find(|(name, _)| name == key) else {
            let mut allowed: Vec<&str> = schema.iter().chain(extra).map(|(k, _)| *k).collect();
            allowed.sort_unstable();
            allowed.dedup();
            return Err(format!(
                "{section}: unknown key `{key}`; allowed keys are {}",
                allowed.join(", ")
            ));
        };
        if !value_kind_ok(value, *kind) {
            return Err(format!(
                "{section}: `{key}` must be {}, found {} `{value}`",
                kind.describe(),
                value.type_str()
            ));
        }
    }
    Ok(())
}

/// Looks `key` up in the dataset's table, then `[general]`.
fn lookup<'a>(
    key: &str,
    table: &'a Map<String, Value>,
    general: &'a Map<String, Value>,
) -> Option<(&'a Value, &'static str)> {
    table
        .get(key)
        .map(|v| (v, "dataset"))
        .or_else(|| general.get(key).map(|v| (v, "[general]")))
}

fn positive(value: &Value, key: &str, section: &str) -> std::result::Result<u32, String> {
    let number = value.as_integer().unwrap_or(0);
    u32::try_from(number)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{section}: `{key}` must be a positive integer, found {number}"))
}

fn pair(value: &Value, key: &str, section: &str) -> std::result::Result<(u32, u32), String> {
    match value {
        Value::Array(items) => Ok((
            positive(&items[0], key, section)?,
            positive(&items[1], key, section)?,
        )),
        single => {
            let n = positive(single, key, section)?;
            Ok((n, n))
        }
    }
}

fn string(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

fn resolve_dataset(
    index: usize,
    table: &Map<String, Value>,
    general: &Map<String, Value>,
    fallbacks: &ConfigFallbacks,
) -> std::result::Result<DatasetSpec, String> {
    let section = format!("datasets[{index}]");
    let is_video = table.contains_key("video_directory") || table.contains_key("video_jsonl_file");
    let distinct = if is_video { VIDEO_ONLY } else { IMAGE_ONLY };
    check_schema(table, ASCENDABLE, distinct, &section)?;
    let path_of = |key: &str| table.get(key).map(|v| PathBuf::from(string(v)));

    let source = if is_video {
        let path = path_of("video_directory")
            .or_else(|| path_of("video_jsonl_file"))
            .unwrap_or_default();
        DatasetSource::Video(path)
    } else {
        match (path_of("image_directory"), path_of("image_jsonl_file")) {
            (Some(directory), None) => DatasetSource::ImageDirectory(directory),
            (None, Some(file)) => DatasetSource::ImageJsonl(file),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{section}: set either `image_directory` or `image_jsonl_file`, not both"
                ))
            }
            (None, None) => {
                return Err(format!(
                    "{section}: needs `image_directory` or `image_jsonl_file` (or a video source)"
                ))
            }
        }
    };

    let resolution = match lookup("resolution", table, general) {
        Some((value, _)) => pair(value, "resolution", &section)?,
        None => DEFAULT_RESOLUTION,
    };
    let batch_size = match lookup("batch_size", table, general) {
        Some((value, _)) => positive(value, "batch_size", &section)? as usize,
        None => fallbacks.batch_size.unwrap_or(1),
    };
    let num_repeats = match lookup("num_repeats", table, general) {
        Some((value, _)) => positive(value, "num_repeats", &section)? as usize,
        None => 1,
    };
    let flag = |key: &str| {
        lookup(key, table, general)
            .and_then(|(v, _)| v.as_bool())
            .unwrap_or(false)
    };
    let enable_bucket = flag("enable_bucket");
    let bucket_no_upscale = enable_bucket && flag("bucket_no_upscale");
    let caption_extension = lookup("caption_extension", table, general).map(|(v, _)| string(v));
    let control_resolution = table
        .get("control_resolution")
        .map(|v| pair(v, "control_resolution", &section))
        .transpose()?;
    let no_resize_control = table
        .get("no_resize_control")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let multiple_target = table
        .get("multiple_target")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let alpha_mask = table
        .get("alpha_mask")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mask_directory = path_of("mask_directory");
    if alpha_mask && mask_directory.is_some() {
        return Err(format!(
            "{section}: set either `alpha_mask = true` or `mask_directory`, not both (one loss \
             mask per image)"
        ));
    }

    if !enable_bucket
        && (resolution.0 % RESOLUTION_STEPS != 0 || resolution.1 % RESOLUTION_STEPS != 0)
    {
        return Err(format!(
            "{section}: `resolution` = [{}, {}] must be multiples of {RESOLUTION_STEPS} when \
             `enable_bucket` is false (it is then the one bucket every image is cropped to)",
            resolution.0, resolution.1
        ));
    }

    let cache_directory = match (path_of("cache_directory"), &source) {
        (Some(directory), _) => directory,
        (None, DatasetSource::ImageDirectory(directory)) => directory.clone(),
        (None, DatasetSource::Video(path)) => path.clone(),
        (None, DatasetSource::ImageJsonl(_)) => {
            return Err(format!(
                "{section}: `cache_directory` is required for a dataset with `image_jsonl_file`"
            ))
        }
    };
    Ok(DatasetSpec {
        index,
        source,
        cache_directory,
        control_directory: path_of("control_directory"),
        resolution,
        caption_extension,
        batch_size,
        num_repeats,
        enable_bucket,
        bucket_no_upscale,
        no_resize_control,
        control_resolution,
        multiple_target,
        alpha_mask,
        mask_directory,
    })
}

/// A JSON configuration as TOML values (JSON `null` has no TOML form and is refused).
fn json_to_toml(value: &serde_json::Value, at: &str) -> std::result::Result<Value, String> {
    Ok(match value {
        serde_json::Value::Null => return Err(format!("{at}: null is not a valid value")),
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(s.clone()),
        serde_json::Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| json_to_toml(item, at))
                .collect::<std::result::Result<_, _>>()?,
        ),
        serde_json::Value::Object(map) => {
            let mut table = Map::new();
            for (key, item) in map {
                table.insert(key.clone(), json_to_toml(item, &format!("`{key}`"))?);
            }
            Value::Table(table)
        }
    })
}
