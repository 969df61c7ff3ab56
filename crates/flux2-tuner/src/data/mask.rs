//! Loss masks for masked training, beyond Musubi Tuner (which has none). The idea and the
//! dataset options follow kohya-ss/sd-scripts (`--masked_loss`, a subset's `alpha_mask`, masks in
//! `conditioning_data_dir`, `apply_masked_loss`) and the `mask_directory` key of blissful-tuner:
//! * `alpha_mask = true`: the image's alpha channel is the mask (an image without alpha trains
//!   everywhere, as sd-scripts);
//! * `mask_directory = "..."`: a greyscale image with the image's stem (any image extension);
//!   white trains, black is ignored, grey weights in between. A colour mask is read by its red
//!   channel, as sd-scripts reads `conditioning_images`.
//!
//! The mask goes through the image's own bucket resize and centre crop (a mask of another size is
//! scaled to cover the bucket the same way), then is area-averaged over each 16x16 pixel block:
//! one weight in [0, 1] per cell of the packed latent grid, stored `[1, H/16, W/16]` f32 in the
//! latent cache under `flux2_tuner_loss_mask_{h}x{w}_float32`. Musubi's loader
//! (`BucketBatchManager.__getitem__`) stacks every key of a cache into its batch dict and FLUX.2
//! training reads only `latents`, `latents_control_*` and `ctx_vec`, so the extra key is ignored
//! there and the cache stays usable by Musubi.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage};

use super::config::DatasetSpec;
use super::source::{file_stem, glob_images};
use crate::error::{Error, Result};
use crate::image_io::resize_to_bucket;

/// Prefix of the loss-mask key in a latent cache; no Musubi key starts with it.
pub const LOSS_MASK_PREFIX: &str = "flux2_tuner_loss_mask_";

/// Pixels per side of one packed latent cell (AE 8x, then 2x2 patches).
pub const LATENT_CELL: u32 = 16;

/// `flux2_tuner_loss_mask_{h}x{w}` (without the dtype suffix) for a bucket of `(width, height)`
/// pixels.
pub fn loss_mask_key_base(bucket: (u32, u32)) -> String {
    format!(
        "{LOSS_MASK_PREFIX}{}x{}",
        bucket.1 / LATENT_CELL,
        bucket.0 / LATENT_CELL
    )
}

/// The full key of a `[1, height, width]` f32 loss mask.
pub fn loss_mask_key(height: usize, width: usize) -> String {
    format!("{LOSS_MASK_PREFIX}{height}x{width}_float32")
}

/// Where one image's mask comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum MaskSource {
    /// The alpha channel of the image itself.
    Alpha,
    /// A mask file from `mask_directory`.
    File(PathBuf),
}

/// The masks a dataset offers: none, alpha channels, or the files of a mask directory by stem.
#[derive(Debug, Clone, PartialEq)]
pub enum MaskIndex {
    None,
    Alpha,
    Directory {
        directory: PathBuf,
        by_stem: BTreeMap<String, Vec<PathBuf>>,
    },
}

impl MaskIndex {
    /// Lists the mask directory of `spec` (when it has one).
    pub fn for_dataset(spec: &DatasetSpec) -> Result<Self> {
        if spec.alpha_mask {
            return Ok(Self::Alpha);
        }
        let Some(directory) = &spec.mask_directory else {
            return Ok(Self::None);
        };
        let mut by_stem: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for path in glob_images(directory)? {
            by_stem.entry(file_stem(&path)).or_default().push(path);
        }
        Ok(Self::Directory {
            directory: directory.clone(),
            by_stem,
        })
    }

    /// True when the dataset's caches carry a loss mask.
    pub fn is_active(&self) -> bool {
        !matches!(self, Self::None)
    }

    /// The mask of `image`: an error names the image, the directory and the expected file name
    /// when the mask is missing or ambiguous.
    pub fn source_for(&self, image: &Path) -> Result<Option<MaskSource>> {
        match self {
            Self::None => Ok(None),
            Self::Alpha => Ok(Some(MaskSource::Alpha)),
            Self::Directory { directory, by_stem } => {
                let stem = file_stem(image);
                match by_stem.get(&stem).map(Vec::as_slice) {
                    Some([one]) => Ok(Some(MaskSource::File(one.clone()))),
                    Some(several) => Err(Error::Image {
                        path: image.to_path_buf(),
                        message: format!(
                            "mask_directory {} has {} masks named {stem}.*: {}; keep one",
                            directory.display(),
                            several.len(),
                            several
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    }),
                    None => Err(Error::Image {
                        path: image.to_path_buf(),
                        message: format!(
                            "no mask for this image in mask_directory {} (expected {stem}.png or \
                             another image file with the stem `{stem}`)",
                            directory.display()
                        ),
                    }),
                }
            }
        }
    }
}

/// Decodes an image file with its EXIF orientation applied.
fn decode(path: &Path, what: &str) -> Result<DynamicImage> {
    let image_error = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, format!("cannot open {what}"), e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, format!("cannot read {what}"), e))?;
    if reader.format().is_none() {
        return Err(image_error(format!(
            "{what} is not a PNG, JPEG or WebP image (unrecognised content)"
        )));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| image_error(format!("cannot decode {what}: {e}")))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| image_error(format!("cannot read the EXIF orientation: {e}")))?;
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(|e| image_error(format!("cannot decode {what}: {e}")))?;
    image.apply_orientation(orientation);
    if image.width() == 0 || image.height() == 0 {
        return Err(image_error(format!("the {what} is empty (0 pixels)")));
    }
    Ok(image)
}

/// The alpha channel of an image as 8-bit values (255 everywhere when it has none); 16-bit alpha
/// is rounded to 8 bits as the colour channels are.
pub fn read_alpha(path: &Path) -> Result<GrayImage> {
    let image = decode(path, "image")?;
    if !image.color().has_alpha() {
        return Ok(GrayImage::from_pixel(
            image.width(),
            image.height(),
            image::Luma([255]),
        ));
    }
    let rgba = image.to_rgba8();
    Ok(GrayImage::from_fn(image.width(), image.height(), |x, y| {
        image::Luma([rgba.get_pixel(x, y)[3]])
    }))
}

/// A mask file as 8-bit values: the grey level, or the red channel of a colour image.
pub fn read_mask_file(path: &Path) -> Result<GrayImage> {
    let rgb = decode(path, "mask")?.to_rgb8();
    Ok(GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        image::Luma([rgb.get_pixel(x, y)[0]])
    }))
}

/// Resizes and centre-crops a mask to `bucket` with the image's own rules
/// ([`resize_to_bucket`]: Lanczos up, area down), channel by channel as the image is.
pub fn mask_to_bucket(mask: &GrayImage, bucket: (u32, u32), path: &Path) -> Result<GrayImage> {
    let rgb = RgbImage::from_fn(mask.width(), mask.height(), |x, y| {
        let value = mask.get_pixel(x, y)[0];
        image::Rgb([value, value, value])
    });
    let resized = resize_to_bucket(&rgb, bucket).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: format!(
            "cannot resize the mask to the {}x{} bucket: {e}",
            bucket.0, bucket.1
        ),
    })?;
    Ok(GrayImage::from_fn(
        resized.width(),
        resized.height(),
        |x, y| image::Luma([resized.get_pixel(x, y)[0]]),
    ))
}

/// Area-averages a bucket-sized mask over 16x16 blocks: `[1, H/16, W/16]` f32 in [0, 1], each
/// value `sum(block) / (255 * 256)` (the sum is exact in integers, the division rounds once).
pub fn latent_mask(mask: &GrayImage) -> Result<Tensor> {
    let (width, height) = (mask.width(), mask.height());
    if width % LATENT_CELL != 0 || height % LATENT_CELL != 0 || width == 0 || height == 0 {
        return Err(Error::Shape(format!(
            "a loss mask must be a non-empty multiple of {LATENT_CELL} pixels a side, got \
             {width}x{height}"
        )));
    }
    let (grid_width, grid_height) = (width / LATENT_CELL, height / LATENT_CELL);
    let scale = 255.0 * (LATENT_CELL * LATENT_CELL) as f64;
    let mut values = Vec::with_capacity((grid_width * grid_height) as usize);
    for row in 0..grid_height {
        for column in 0..grid_width {
            let mut sum = 0u32;
            for y in row * LATENT_CELL..(row + 1) * LATENT_CELL {
                for x in column * LATENT_CELL..(column + 1) * LATENT_CELL {
                    sum += mask.get_pixel(x, y)[0] as u32;
                }
            }
            values.push((sum as f64 / scale) as f32);
        }
    }
    Ok(Tensor::from_vec(
        values,
        (1, grid_height as usize, grid_width as usize),
        &Device::Cpu,
    )?)
}

/// Reads the mask of `image` from `source`, sizes it to `bucket` and averages it to the latent
/// grid: `[1, H/16, W/16]` f32 on the CPU.
pub fn load_latent_mask(source: &MaskSource, image: &Path, bucket: (u32, u32)) -> Result<Tensor> {
    let (mask, path) = match source {
        MaskSource::Alpha => (read_alpha(image)?, image),
        MaskSource::File(path) => (read_mask_file(path)?, path.as_path()),
    };
    latent_mask(&mask_to_bucket(&mask, bucket, path)?)
}
