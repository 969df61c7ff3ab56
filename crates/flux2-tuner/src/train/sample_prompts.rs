//! Musubi's sample-prompt files for images during training (`--sample_prompts`; Musubi
//! `training/sampling_prompts.py` `load_prompts` / `line_to_prompt_dict`, with the FLUX.2 defaults
//! of `trainer_base.sample_image_inference` and `Flux2NetworkTrainer`):
//! - `.txt`: one prompt per line; empty lines and lines starting with `#` are skipped. Inline
//!   options follow the prompt, split on `" --"`, names case-insensitive: `--w` width, `--h`
//!   height, `--d` seed, `--s` steps (clamped to 1..=1000), `--g` guidance (CFG scale for
//!   klein-base, embedded guidance for dev), `--fs` fixed flow shift, `--n` negative prompt,
//!   `--ci` control image (repeatable). `--f` (frames), `--l` (cfg scale), `--i`, `--ei`, `--cn`
//!   and `--of` are accepted and unused, as in Musubi's FLUX.2 trainer.
//! - `.toml`: the keys of the `[prompt]` table are defaults for every `[[prompt.subset]]` table.
//! - `.json`: a list whose entries are objects (Musubi's keys: `prompt`, `width`, `height`,
//!   `seed`, `sample_steps`, `guidance_scale`, `discrete_flow_shift`, `negative_prompt`,
//!   `control_image_path`, ...) or strings (prompt lines as in `.txt`).
//!
//! Defaults: 256 x 256, 20 steps, guidance 4.0, negative prompt `" "`.
//!
//! Deliberate differences from Musubi:
//! - A bad value or an unknown option is an error naming the file and the line or entry (Musubi
//!   logs it and goes on without it).
//! - Width and height are floored to multiples of 16. Musubi floors them to 8, but its latent is
//!   `H/16 x W/16`, so the image it writes is the size floored to 16 anyway.
//! - A `[[prompt.subset]]` key overrides the same `[prompt]` key (Musubi raises on duplicates).
//! - Without `--d`, the seed is derived from the training seed and the prompt's position, so every
//!   sampling event of a run (and a rerun) uses the same noise (Musubi draws a random one each
//!   time). As in Musubi, only a seed given in the file appears in the output name.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::sample::generate::PIXELS_PER_LATENT;
use crate::sample::request::ImageRequest;
use crate::util::rng::SeededRng;

/// Musubi's sample size for every architecture (`sample_image_inference`).
pub const DEFAULT_SIZE: usize = 256;
/// Musubi's default number of sampling steps.
pub const DEFAULT_STEPS: usize = 20;
/// `Flux2NetworkTrainer.default_guidance_scale`.
pub const DEFAULT_GUIDANCE: f64 = 4.0;
/// `Flux2NetworkTrainer.process_sample_prompts` encodes a single space when no negative is given.
pub const DEFAULT_NEGATIVE_PROMPT: &str = " ";
/// Musubi clamps `--s` to this.
pub const MAX_STEPS: usize = 1000;

/// One prompt of a sample-prompt file with every setting resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePrompt {
    /// Position in the file (the `{idx:02d}` of the output name).
    pub index: usize,
    pub request: ImageRequest,
    /// Whether the file gave the seed (then it ends the output name, as in Musubi).
    pub seed_given: bool,
}

/// The settings one line or table gives, before defaults.
#[derive(Debug, Default, Clone)]
struct Fields {
    prompt: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    steps: Option<usize>,
    seed: Option<u64>,
    guidance: Option<f64>,
    flow_shift: Option<f64>,
    negative_prompt: Option<String>,
    control_images: Vec<PathBuf>,
}

/// Reads a sample-prompt file (`.txt`, `.toml` or `.json`). Seeds missing from the file are
/// derived from `training_seed`.
pub fn load_sample_prompts(path: &Path, training_seed: u64) -> Result<Vec<SamplePrompt>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(path, "cannot read the sample prompt file", e))?;
    parse_sample_prompts(path, &text, training_seed)
}

/// Parses the text of a sample-prompt file; `path` picks the format by its extension and names
/// the file in errors.
pub fn parse_sample_prompts(
    path: &Path,
    text: &str,
    training_seed: u64,
) -> Result<Vec<SamplePrompt>> {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let entries: Vec<(String, Fields)> = match extension.as_str() {
        "txt" => text
            .lines()
            .enumerate()
            .map(|(number, line)| (number + 1, line.trim()))
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
            .map(|(number, line)| {
                let location = format!("line {number}");
                Ok((location.clone(), parse_line(path, &location, line)?))
            })
            .collect::<Result<_>>()?,
        "toml" => toml_entries(path, text)?,
        "json" => json_entries(path, text)?,
        _ => {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                message: "a sample prompt file must end in .txt, .toml or .json".into(),
            })
        }
    };
    if entries.is_empty() {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            message: "no prompts in the file".into(),
        });
    }
    entries
        .into_iter()
        .enumerate()
        .map(|(index, (location, fields))| resolve(path, &location, index, fields, training_seed))
        .collect()
}

fn bad(path: &Path, location: &str, message: String) -> Error {
    Error::InvalidConfig {
        path: path.to_path_buf(),
        message: format!("{location}: {message}"),
    }
}

/// A prompt line with inline options.
fn parse_line(path: &Path, location: &str, line: &str) -> Result<Fields> {
    let mut pieces = line.split(" --");
    let mut fields = Fields {
        prompt: Some(pieces.next().unwrap_or_default().trim().to_string()),
        ..Fields::default()
    };
    for piece in pieces {
        let piece = piece.trim();
        let (name, value) = piece.split_once(char::is_whitespace).unwrap_or((piece, ""));
        let name = name.to_lowercase();
        let value = value.trim();
        let error = |expected: &str| {
            bad(
                path,
                location,
                format!("--{name}: `{value}` is not {expected}"),
            )
        };
        if value.is_empty() {
            return Err(error("a value (the option needs one)"));
        }
        let integer = || value.parse::<usize>().map_err(|_| error("a whole number"));
        let number = || value.parse::<f64>().map_err(|_| error("a number"));
        match name.as_str() {
            "w" => fields.width = Some(integer()?),
            "h" => fields.height = Some(integer()?),
            "s" => fields.steps = Some(integer()?),
            "d" => {
                fields.seed = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| error("a seed (a whole number)"))?,
                )
            }
            "g" => fields.guidance = Some(number()?),
            "fs" => fields.flow_shift = Some(number()?),
            "n" => fields.negative_prompt = Some(value.to_string()),
            "ci" => fields.control_images.push(PathBuf::from(value)),
            // Frames and Musubi's `cfg_scale` are parsed but unused for FLUX.2 images.
            "f" => {
                integer()?;
            }
            "l" => {
                number()?;
            }
            // Image-to-video, end-image, control-video and one-frame paths of other models.
            "i" | "ei" | "cn" | "of" => {}
            _ => {
                return Err(bad(
                    path,
                    location,
                    format!(
                        "unknown option --{name}; known: --w --h --d --s --g --fs --n --ci \
                         (and --f --l --i --ei --cn --of, unused for FLUX.2)"
                    ),
                ))
            }
        }
    }
    Ok(fields)
}

/// `[prompt]` defaults merged into each `[[prompt.subset]]`.
fn toml_entries(path: &Path, text: &str) -> Result<Vec<(String, Fields)>> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::InvalidConfig {
            path: path.to_path_buf(),
            message: format!("not valid TOML: {e}"),
        })?;
    let value = serde_json::to_value(&table).map_err(|e| Error::InvalidConfig {
        path: path.to_path_buf(),
        message: format!("unreadable TOML values: {e}"),
    })?;
    let prompt = value
        .get("prompt")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(path, "the file", "needs a [prompt] table".into()))?;
    let subsets = prompt
        .get("subset")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            bad(
                path,
                "[prompt]",
                "needs [[prompt.subset]] tables (one per prompt)".into(),
            )
        })?;
    let mut defaults = prompt.clone();
    defaults.remove("subset");
    subsets
        .iter()
        .enumerate()
        .map(|(number, subset)| {
            let location = format!("[[prompt.subset]] number {}", number + 1);
            let subset = subset
                .as_object()
                .ok_or_else(|| bad(path, &location, "is not a table".into()))?;
            let mut merged = defaults.clone();
            for (key, value) in subset {
                merged.insert(key.clone(), value.clone());
            }
            Ok((location.clone(), parse_map(path, &location, &merged)?))
        })
        .collect()
}

/// A list of objects or prompt lines.
fn json_entries(path: &Path, text: &str) -> Result<Vec<(String, Fields)>> {
    let value: Value = serde_json::from_str(text).map_err(|e| Error::InvalidConfig {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })?;
    let list = value.as_array().ok_or_else(|| {
        bad(
            path,
            "the file",
            "must be a list of objects or strings".into(),
        )
    })?;
    list.iter()
        .enumerate()
        .map(|(number, entry)| {
            let location = format!("entry {}", number + 1);
            let fields = match entry {
                Value::String(line) => parse_line(path, &location, line.trim())?,
                Value::Object(map) => parse_map(path, &location, map)?,
                other => {
                    return Err(bad(
                        path,
                        &location,
                        format!("`{other}` is not an object or a string"),
                    ))
                }
            };
            Ok((location, fields))
        })
        .collect()
}

/// An object with Musubi's `prompt_dict` keys.
fn parse_map(path: &Path, location: &str, map: &Map<String, Value>) -> Result<Fields> {
    let mut fields = Fields::default();
    for (key, value) in map {
        let error = |expected: &str| {
            bad(
                path,
                location,
                format!("{key}: `{value}` is not {expected}"),
            )
        };
        let integer = || {
            value
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| error("a whole number"))
        };
        let number = || value.as_f64().ok_or_else(|| error("a number"));
        let string = || {
            value
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| error("a string"))
        };
        match key.as_str() {
            "prompt" => fields.prompt = Some(string()?),
            "width" => fields.width = Some(integer()?),
            "height" => fields.height = Some(integer()?),
            "sample_steps" => fields.steps = Some(integer()?),
            "seed" => fields.seed = Some(value.as_u64().ok_or_else(|| error("a seed"))?),
            "guidance_scale" => fields.guidance = Some(number()?),
            "discrete_flow_shift" => fields.flow_shift = Some(number()?),
            "negative_prompt" => fields.negative_prompt = Some(string()?),
            "control_image_path" => match value {
                Value::String(path) => fields.control_images.push(PathBuf::from(path)),
                Value::Array(paths) => {
                    for item in paths {
                        let item = item.as_str().ok_or_else(|| error("a list of paths"))?;
                        fields.control_images.push(PathBuf::from(item));
                    }
                }
                _ => return Err(error("a path or a list of paths")),
            },
            "frame_count" => {
                integer()?;
            }
            "cfg_scale" => {
                number()?;
            }
            "image_path" | "end_image_path" | "control_video_path" | "one_frame" | "enum" => {}
            _ => {
                return Err(bad(
                    path,
                    location,
                    format!(
                        "unknown key `{key}`; known: prompt, width, height, seed, sample_steps, \
                         guidance_scale, discrete_flow_shift, negative_prompt, control_image_path \
                         (and frame_count, cfg_scale, image_path, end_image_path, \
                         control_video_path, one_frame, unused for FLUX.2)"
                    ),
                ))
            }
        }
    }
    Ok(fields)
}

/// The seed of a prompt without `--d`: fixed per run and position.
pub fn derived_seed(training_seed: u64, index: usize) -> u64 {
    // "SAMPLE" in ASCII keeps these seeds apart from the training noise stream.
    let salt = 0x5341_4D50_4C45_u64;
    SeededRng::new(training_seed ^ salt ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .next_u64()
        >> 32
}

/// Applies the defaults and checks the result with `generate`'s request validation.
fn resolve(
    path: &Path,
    location: &str,
    index: usize,
    fields: Fields,
    training_seed: u64,
) -> Result<SamplePrompt> {
    let floor = |name: &str, value: usize| {
        let floored = value / PIXELS_PER_LATENT * PIXELS_PER_LATENT;
        if floored == 0 {
            Err(bad(
                path,
                location,
                format!("{name} {value} is below the smallest size, {PIXELS_PER_LATENT} pixels"),
            ))
        } else {
            Ok(floored)
        }
    };
    for control in &fields.control_images {
        if !control.is_file() {
            return Err(bad(
                path,
                location,
                format!("control image {} does not exist", control.display()),
            ));
        }
    }
    let request = ImageRequest {
        prompt: fields.prompt.unwrap_or_default(),
        negative_prompt: Some(
            fields
                .negative_prompt
                .unwrap_or_else(|| DEFAULT_NEGATIVE_PROMPT.to_string()),
        ),
        height: floor("height", fields.height.unwrap_or(DEFAULT_SIZE))?,
        width: floor("width", fields.width.unwrap_or(DEFAULT_SIZE))?,
        steps: fields.steps.unwrap_or(DEFAULT_STEPS).clamp(1, MAX_STEPS),
        guidance: fields.guidance.unwrap_or(DEFAULT_GUIDANCE),
        seed: fields
            .seed
            .unwrap_or_else(|| derived_seed(training_seed, index)),
        flow_shift: fields.flow_shift,
        control_images: fields.control_images,
    };
    request
        .check()
        .map_err(|e| bad(path, location, e.to_string()))?;
    Ok(SamplePrompt {
        index,
        request,
        seed_given: fields.seed.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> Result<Vec<SamplePrompt>> {
        parse_sample_prompts(Path::new(name), text, 42)
    }

    fn error(name: &str, text: &str) -> String {
        parse(name, text).unwrap_err().to_string()
    }

    fn control_image() -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "flux2-sample-prompts-control-{}.png",
            std::process::id()
        ));
        std::fs::write(&path, b"not read by the parser").unwrap();
        path
    }

    #[test]
    fn txt_lines_with_case_insensitive_options_comments_and_defaults() {
        let control = control_image();
        let text = format!(
            "# a comment\n\n a red fox --W 520 --h 300 --S 2000 --d 7 --G 2.5 --fs 3 --N blurry, dark \
             --ci {0} --CI {0} --f 1 --l 7 --i x.png\nplain prompt\n",
            control.display()
        );
        let prompts = parse("prompts.txt", &text).unwrap();
        assert_eq!(prompts.len(), 2);
        let first = &prompts[0];
        assert_eq!(first.index, 0);
        assert!(first.seed_given);
        let r = &first.request;
        assert_eq!(r.prompt, "a red fox");
        // 520 -> 512 and 300 -> 288 (multiples of 16); steps clamped to 1000.
        assert_eq!((r.width, r.height, r.steps, r.seed), (512, 288, 1000, 7));
        assert_eq!((r.guidance, r.flow_shift), (2.5, Some(3.0)));
        assert_eq!(r.negative_prompt.as_deref(), Some("blurry, dark"));
        assert_eq!(r.control_images, vec![control.clone(), control]);
        let second = &prompts[1];
        assert_eq!(second.index, 1);
        assert!(!second.seed_given);
        let r = &second.request;
        assert_eq!(
            (r.width, r.height, r.steps, r.guidance),
            (256, 256, 20, 4.0)
        );
        assert_eq!(r.negative_prompt.as_deref(), Some(" "));
        assert_eq!(r.flow_shift, None);
        assert!(r.control_images.is_empty());
        assert_eq!(r.seed, derived_seed(42, 1));
    }

    #[test]
    fn derived_seeds_are_fixed_per_run_and_position() {
        assert_eq!(derived_seed(42, 0), derived_seed(42, 0));
        assert_ne!(derived_seed(42, 0), derived_seed(42, 1));
        assert_ne!(derived_seed(42, 0), derived_seed(43, 0));
        assert!(derived_seed(42, 0) < 1 << 32);
        let a = parse("p.txt", "x\ny").unwrap();
        let b = parse("p.txt", "x\ny").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn txt_errors_name_the_file_and_line() {
        let e = error("p.txt", "# c\nok\nbad --w wide");
        assert!(
            e.contains("p.txt") && e.contains("line 3") && e.contains("--w") && e.contains("wide"),
            "{e}"
        );
        let e = error("p.txt", "x --zz 1");
        assert!(
            e.contains("line 1") && e.contains("unknown option --zz"),
            "{e}"
        );
        let e = error("p.txt", "x --d");
        assert!(e.contains("--d") && e.contains("needs one"), "{e}");
        let e = error("p.txt", "x --w 8");
        assert!(e.contains("width 8"), "{e}");
        let e = error("p.txt", "x --ci /no/such/control.png");
        assert!(
            e.contains("line 1") && e.contains("/no/such/control.png"),
            "{e}"
        );
        let e = error("p.txt", "# only comments\n\n");
        assert!(e.contains("no prompts"), "{e}");
        let e = error("p.csv", "x");
        assert!(e.contains(".txt, .toml or .json"), "{e}");
    }

    #[test]
    fn toml_defaults_merge_into_subsets() {
        let text = r#"
            [prompt]
            width = 512
            sample_steps = 8
            negative_prompt = "low quality"

            [[prompt.subset]]
            prompt = "a cat"
            seed = 5

            [[prompt.subset]]
            prompt = "a dog"
            width = 320
            height = 128
            guidance_scale = 1.5
            discrete_flow_shift = 2.0
        "#;
        let prompts = parse("p.toml", text).unwrap();
        assert_eq!(prompts.len(), 2);
        let (a, b) = (&prompts[0].request, &prompts[1].request);
        assert_eq!(
            (a.prompt.as_str(), a.width, a.height, a.steps),
            ("a cat", 512, 256, 8)
        );
        assert_eq!((a.seed, prompts[0].seed_given), (5, true));
        assert_eq!(a.negative_prompt.as_deref(), Some("low quality"));
        assert_eq!(
            (b.prompt.as_str(), b.width, b.height, b.steps),
            ("a dog", 320, 128, 8)
        );
        assert_eq!((b.guidance, b.flow_shift), (1.5, Some(2.0)));
        assert_eq!(b.seed, derived_seed(42, 1));
    }

    #[test]
    fn toml_errors_name_the_file_and_subset() {
        let e = error(
            "p.toml",
            "[prompt]\n[[prompt.subset]]\nprompt = 'a'\n[[prompt.subset]]\nwidht = 5\n",
        );
        assert!(
            e.contains("p.toml") && e.contains("subset]] number 2") && e.contains("widht"),
            "{e}"
        );
        let e = error(
            "p.toml",
            "[prompt]\nwidth = 'wide'\n[[prompt.subset]]\nprompt = 'a'\n",
        );
        assert!(e.contains("width") && e.contains("whole number"), "{e}");
        let e = error("p.toml", "[other]\n");
        assert!(e.contains("[prompt]"), "{e}");
        let e = error("p.toml", "[prompt]\nwidth = 5\n");
        assert!(e.contains("[[prompt.subset]]"), "{e}");
        let e = error("p.toml", "[prompt\n");
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn json_lists_of_objects_and_strings() {
        let control = control_image();
        let text = format!(
            r#"[{{"prompt": "a cat", "width": 128, "height": 64, "seed": 9, "sample_steps": 3,
                 "control_image_path": ["{0}"], "frame_count": 1, "enum": 0}},
                "a dog --h 32 --d 4"]"#,
            control.display()
        );
        let prompts = parse("p.json", &text).unwrap();
        let (a, b) = (&prompts[0].request, &prompts[1].request);
        assert_eq!(
            (a.prompt.as_str(), a.width, a.height, a.steps, a.seed),
            ("a cat", 128, 64, 3, 9)
        );
        assert_eq!(a.control_images, vec![control]);
        assert_eq!(a.negative_prompt.as_deref(), Some(" "));
        assert_eq!(
            (b.prompt.as_str(), b.width, b.height, b.seed),
            ("a dog", 256, 32, 4)
        );
        assert_eq!(prompts[1].index, 1);
    }

    #[test]
    fn json_errors_name_the_file_and_entry() {
        let e = error("p.json", r#"["ok", {"prompt": "x", "seed": -1}]"#);
        assert!(
            e.contains("p.json") && e.contains("entry 2") && e.contains("seed"),
            "{e}"
        );
        let e = error("p.json", r#"["ok", 5]"#);
        assert!(
            e.contains("entry 2") && e.contains("not an object or a string"),
            "{e}"
        );
        let e = error("p.json", r#"{"prompt": "x"}"#);
        assert!(e.contains("must be a list"), "{e}");
        let e = error("p.json", r#"["x --s many"]"#);
        assert!(e.contains("entry 1") && e.contains("--s"), "{e}");
        let e = error("p.json", "[");
        assert!(e.contains("not valid JSON"), "{e}");
    }
}
