//! Finding a dataset's items as Musubi's datasources do (`dataset/datasources.py`,
//! `dataset/media_utils.py` `glob_images`): images with caption files in a directory, or the lines
//! of a JSONL file, each with its control images.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use image::{ImageDecoder, ImageReader};

use super::config::{DatasetSource, DatasetSpec};
use crate::error::{Error, Result};

/// Musubi's `IMAGE_EXTENSIONS` (case matters: `.Png` is not an image to Musubi either).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP", ".avif",
    ".AVIF",
];

/// One training image with its caption and control images.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetItem {
    pub image_path: PathBuf,
    pub caption: String,
    /// Control (reference) images in index order: `latents_control_{i}` is the i-th.
    pub control_paths: Vec<PathBuf>,
}

impl DatasetItem {
    /// The cache base name: the image file name without its extension (Musubi's
    /// `splitext(basename(item_key))`).
    pub fn stem(&self) -> String {
        file_stem(&self.image_path)
    }
}

/// `os.path.splitext(os.path.basename(path))[0]`: a leading dot does not start an extension.
pub fn file_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.rfind('.') {
        Some(dot) if name[..dot].chars().any(|c| c != '.') => name[..dot].to_string(),
        _ => name,
    }
}

/// `glob(directory/*ext)` for every image extension, sorted: files only, no hidden files.
pub fn glob_images(directory: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(directory)
        .map_err(|e| Error::io(directory, "cannot list the directory", e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(directory, "cannot list the directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        if IMAGE_EXTENSIONS.iter().any(|ext| name.ends_with(ext)) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// The items of an image dataset, in Musubi's order (sorted paths, or JSONL line order).
pub fn discover_items(spec: &DatasetSpec) -> Result<Vec<DatasetItem>> {
    match &spec.source {
        DatasetSource::ImageDirectory(directory) => discover_directory(spec, directory),
        DatasetSource::ImageJsonl(file) => read_jsonl(file),
        DatasetSource::Video(path) => Err(Error::InvalidArgument {
            name: spec.name(),
            message: format!(
                "{} is a video dataset; FLUX.2 trains on images only",
                path.display()
            ),
        }),
    }
}

fn discover_directory(spec: &DatasetSpec, directory: &Path) -> Result<Vec<DatasetItem>> {
    // Musubi would fail reading the caption `splitext(path)[0] + ""`; say why up front.
    let Some(extension) = spec.caption_extension.clone() else {
        return Err(Error::InvalidArgument {
            name: format!("{}: caption_extension", spec.name()),
            message: format!(
                "required for `image_directory` {} (set it in the dataset or in [general], for \
                 example \".txt\")",
                directory.display()
            ),
        });
    };
    // Images are kept when a file `*{caption_extension}` has the image's stem as its own stem.
    let caption_stems: BTreeSet<String> = std::fs::read_dir(directory)
        .map_err(|e| Error::io(directory, "cannot list the directory", e))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.') && name.ends_with(&extension))
        .map(|name| file_stem(Path::new(&name)))
        .collect();
    let images: Vec<PathBuf> = glob_images(directory)?
        .into_iter()
        .filter(|path| caption_stems.contains(&file_stem(path)))
        .collect();
    let controls = match &spec.control_directory {
        Some(control_directory) => Some(match_controls(&images, control_directory)?),
        None => None,
    };
    images
        .into_iter()
        .map(|image_path| {
            let caption_path = caption_path(&image_path, &extension);
            let caption = std::fs::read_to_string(&caption_path)
                .map_err(|e| Error::io(&caption_path, "cannot read the caption", e))?
                .trim()
                .to_string();
            let control_paths = match &controls {
                Some(map) => map.get(&image_path).cloned().unwrap_or_default(),
                None => Vec::new(),
            };
            Ok(DatasetItem {
                image_path,
                caption,
                control_paths,
            })
        })
        .collect()
}

/// `splitext(image_path)[0] + caption_extension`.
fn caption_path(image_path: &Path, extension: &str) -> PathBuf {
    image_path.with_file_name(format!("{}{extension}", file_stem(image_path)))
}

/// Musubi's control matching: images longest name first; a control file belongs to stem `s` when
/// its name starts with `s.` or `s_`; each control is used once; the exact stem sorts first, then
/// the numeric suffix (`_0`, `_1`, `_0000`...). A non-numeric suffix and an image without any
/// control are errors.
fn match_controls(
    images: &[PathBuf],
    control_directory: &Path,
) -> Result<BTreeMap<PathBuf, Vec<PathBuf>>> {
    let mut available: BTreeSet<PathBuf> = glob_images(control_directory)?.into_iter().collect();
    let mut by_length: Vec<&PathBuf> = images.iter().collect();
    // Python's stable sort by basename length, longest first.
    by_length.sort_by_key(|p| {
        std::cmp::Reverse(
            p.file_name()
                .map(|n| n.to_string_lossy().len())
                .unwrap_or(0),
        )
    });
    let mut matched = BTreeMap::new();
    for image in by_length {
        let stem = file_stem(image);
        let found: Vec<PathBuf> = available
            .iter()
            .filter(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                name.starts_with(&format!("{stem}.")) || name.starts_with(&format!("{stem}_"))
            })
            .cloned()
            .collect();
        for path in &found {
            available.remove(path);
        }
        if found.is_empty() {
            continue;
        }
        let mut keyed = Vec::new();
        for path in found {
            let control_stem = file_stem(&path);
            let order = if control_stem == stem {
                0
            } else {
                let suffix = control_stem.rsplit('_').next().unwrap_or_default();
                if suffix.is_empty() || !suffix.chars().all(|c| c.is_ascii_digit()) {
                    return Err(Error::Image {
                        path: path.clone(),
                        message: format!(
                            "control image for {} has a non-numeric suffix `{suffix}`; name \
                             controls {stem}.ext, {stem}_0.ext, {stem}_1.ext, ...",
                            image.display()
                        ),
                    });
                }
                suffix.parse::<u64>().unwrap_or(u64::MAX).saturating_add(1)
            };
            keyed.push((order, path));
        }
        keyed.sort();
        matched.insert(
            image.clone(),
            keyed.into_iter().map(|(_, path)| path).collect(),
        );
    }
    let missing: Vec<&PathBuf> = images
        .iter()
        .filter(|p| !matched.contains_key(*p))
        .collect();
    if let Some(first) = missing.first() {
        return Err(Error::Image {
            path: (*first).clone(),
            message: format!(
                "no control image in {} for this image ({} images without one); every image \
                 needs a control named {}.ext or {}_N.ext",
                control_directory.display(),
                missing.len(),
                file_stem(first),
                file_stem(first)
            ),
        });
    }
    Ok(matched)
}

/// `ImageJsonlDatasource`: one object per line with `image_path`, `caption` and `control_path` or
/// `control_path_N` (renumbered densely in numeric order). Blank lines are skipped.
fn read_jsonl(file: &Path) -> Result<Vec<DatasetItem>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::io(file, "cannot read the JSONL file", e))?;
    let mut items = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |message: String| Error::InvalidConfig {
            path: file.to_path_buf(),
            message: format!("line {}: {message}", number + 1),
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| error(format!("not valid JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| error("expected a JSON object".into()))?;
        let text_field = |key: &str| -> Result<Option<String>> {
            match object.get(key) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(error(format!("`{key}` must be a string, found {other}"))),
            }
        };
        let image_path = match text_field("image_path")? {
            Some(path) => path,
            None => {
                text_field("image_path_0")?.ok_or_else(|| error("missing `image_path`".into()))?
            }
        };
        let caption = text_field("caption")?.ok_or_else(|| error("missing `caption`".into()))?;
        let mut controls: Vec<(u64, String)> = Vec::new();
        for key in object.keys() {
            let index = if key == "control_path" {
                0
            } else if let Some(suffix) = key.strip_prefix("control_path_") {
                suffix.parse::<u64>().map_err(|_| {
                    error(format!(
                        "`{key}`: the suffix after control_path_ must be a number"
                    ))
                })?
            } else {
                continue;
            };
            let path = text_field(key)?.unwrap_or_default();
            controls.push((index, path));
        }
        controls.sort();
        items.push(DatasetItem {
            image_path: PathBuf::from(image_path),
            caption,
            control_paths: controls
                .into_iter()
                .map(|(_, p)| PathBuf::from(p))
                .collect(),
        });
    }
    Ok(items)
}

/// An image's size as [`crate::image_io::read_rgb`] will return it (EXIF orientation applied),
/// read from the header only.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    let image_error = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    let decoder = ImageReader::open(path)
        .map_err(|e| Error::io(path, "cannot open image", e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, "cannot read image", e))?
        .into_decoder()
        .map_err(|e| image_error(format!("cannot decode image: {e}")))?;
    let mut decoder = decoder;
    let (width, height) = decoder.dimensions();
    let orientation = decoder
        .orientation()
        .map_err(|e| image_error(format!("cannot read the EXIF orientation: {e}")))?;
    use image::metadata::Orientation::*;
    Ok(match orientation {
        Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH => (height, width),
        _ => (width, height),
    })
}
