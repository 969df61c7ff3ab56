//! One image to generate, and Musubi's prompt-line syntax (`--from_file`, `--sample_prompts`):
//! `prompt text --w 1024 --h 768 --s 28 --d 42 --g 4.0 --n negative --fs 3 --ci control.png`.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Everything that varies per image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub prompt: String,
    /// For classifier-free guidance (klein-base); `None` means the default negative prompt.
    pub negative_prompt: Option<String>,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    /// CFG scale for klein-base, embedded guidance for dev; unused by distilled klein.
    pub guidance: f64,
    pub seed: u64,
    /// Musubi's fixed shift instead of the FLUX.2 schedule.
    pub flow_shift: Option<f64>,
    pub control_images: Vec<PathBuf>,
}

impl ImageRequest {
    /// Checks sizes (multiples of 16, at least 16) and steps.
    pub fn check(&self) -> Result<()> {
        for (name, value) in [("height", self.height), ("width", self.width)] {
            if value == 0 || value % 16 != 0 {
                return Err(Error::InvalidArgument {
                    name: format!("--image_size ({name})"),
                    message: format!("{value} is not a positive multiple of 16"),
                });
            }
        }
        if self.steps == 0 {
            return Err(Error::InvalidArgument {
                name: "--infer_steps".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// Applies a prompt line's text and inline options to a copy of `defaults`. Lines are split on
/// `" --"` as Musubi does; `--g` and `--l` both set the guidance; `--i` is accepted and unused
/// (Musubi parses it and uses it nowhere).
pub fn parse_prompt_line(line: &str, defaults: &ImageRequest) -> Result<ImageRequest> {
    let mut request = defaults.clone();
    request.control_images = Vec::new();
    let mut pieces = line.split(" --");
    request.prompt = pieces.next().unwrap_or_default().trim().to_string();
    for piece in pieces {
        let piece = piece.trim();
        let (option, value) = piece.split_once(char::is_whitespace).unwrap_or((piece, ""));
        let value = value.trim();
        let bad = |expected: &str| Error::InvalidArgument {
            name: format!("--{option} in prompt line `{line}`"),
            message: format!("`{value}` is not {expected}"),
        };
        let integer = || value.parse::<usize>().map_err(|_| bad("a whole number"));
        let number = || value.parse::<f64>().map_err(|_| bad("a number"));
        match option {
            "w" => request.width = integer()?,
            "h" => request.height = integer()?,
            "s" => request.steps = integer()?,
            "d" => {
                request.seed = value
                    .parse::<u64>()
                    .map_err(|_| bad("a seed (whole number)"))?
            }
            "g" | "l" => request.guidance = number()?,
            "fs" => request.flow_shift = Some(number()?),
            "n" => request.negative_prompt = Some(value.to_string()),
            "ci" => request.control_images.push(PathBuf::from(value)),
            "i" => {}
            _ => {
                return Err(Error::InvalidArgument {
                    name: format!("prompt line `{line}`"),
                    message: format!(
                    "unknown option --{option}; known: --w --h --s --d --g --l --fs --n --ci --i"
                ),
                })
            }
        }
    }
    if request.control_images.is_empty() {
        request.control_images = defaults.control_images.clone();
    }
    Ok(request)
}

/// Reads a prompt file: one request per line; empty lines and `#` comments are skipped.
pub fn parse_prompt_file(text: &str, defaults: &ImageRequest) -> Result<Vec<ImageRequest>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_prompt_line(line, defaults))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ImageRequest {
        ImageRequest {
            prompt: String::new(),
            negative_prompt: None,
            height: 1024,
            width: 1024,
            steps: 4,
            guidance: 1.0,
            seed: 1,
            flow_shift: None,
            control_images: vec![],
        }
    }

    #[test]
    fn inline_options_override_defaults() {
        let r = parse_prompt_line(
            "a cat on a mat --w 768 --h 512 --s 28 --d 42 --g 3.5 --n blurry, dark --fs 2 --ci a.png --ci b.png",
            &defaults(),
        )
        .unwrap();
        assert_eq!(r.prompt, "a cat on a mat");
        assert_eq!((r.width, r.height, r.steps, r.seed), (768, 512, 28, 42));
        assert_eq!(r.guidance, 3.5);
        assert_eq!(r.negative_prompt.as_deref(), Some("blurry, dark"));
        assert_eq!(r.flow_shift, Some(2.0));
        assert_eq!(
            r.control_images,
            vec![PathBuf::from("a.png"), PathBuf::from("b.png")]
        );
    }

    #[test]
    fn bad_values_and_unknown_options_are_errors() {
        let e = parse_prompt_line("x --w wide", &defaults())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--w") && e.contains("wide"), "{e}");
        let e = parse_prompt_line("x --zz 1", &defaults())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--zz"), "{e}");
    }

    #[test]
    fn files_skip_comments_and_blank_lines() {
        let requests = parse_prompt_file("# header\n\na --s 2\nb\n", &defaults()).unwrap();
        assert_eq!(requests.len(), 2);
        assert_eq!((requests[0].prompt.as_str(), requests[0].steps), ("a", 2));
        assert_eq!((requests[1].prompt.as_str(), requests[1].steps), ("b", 4));
    }

    #[test]
    fn sizes_must_be_multiples_of_16() {
        let mut r = defaults();
        r.width = 1000;
        assert!(r.check().unwrap_err().to_string().contains("1000"));
    }
}
