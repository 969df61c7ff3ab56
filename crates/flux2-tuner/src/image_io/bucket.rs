//! Musubi's resize-and-crop rules (`dataset/image_video_dataset.py` `resize_image_to_bucket`,
//! `BucketSelector.calculate_bucket_resolution`, and the control-image rules of
//! `ImageDataset.retrieve_latent_cache_batches`). Sizes are `(width, height)`.

use image::RgbImage;

use super::resize::{resize_area, resize_lanczos};
use crate::error::{Error, Result};

/// Resolution step of every FLUX.2 architecture (`RESOLUTION_STEPS_FLUX_2`).
pub const RESOLUTION_STEPS: u32 = 16;

/// `n - n % d`: floor to a multiple.
pub fn divisible_by(n: u32, d: u32) -> u32 {
    n - n % d
}

/// Scales `image` to cover `bucket` (`scale = max(bw/iw, bh/ih)`, sizes `int(x * scale + 0.5)`),
/// with Pillow Lanczos when enlarging and OpenCV area when shrinking, then crops the centre
/// (offsets `(new - bucket) // 2`). An image already of the bucket's size is returned as it is.
pub fn resize_to_bucket(image: &RgbImage, bucket: (u32, u32)) -> Result<RgbImage> {
    let (width, height) = (image.width(), image.height());
    let (bucket_width, bucket_height) = bucket;
    if bucket_width == 0 || bucket_height == 0 || width == 0 || height == 0 {
        return Err(Error::InvalidArgument {
            name: "bucket".into(),
            message: format!(
                "cannot resize a {width}x{height} image to {bucket_width}x{bucket_height}"
            ),
        });
    }
    if (width, height) == bucket {
        return Ok(image.clone());
    }
    let scale = (bucket_width as f64 / width as f64).max(bucket_height as f64 / height as f64);
    let new_width = (width as f64 * scale + 0.5) as u32;
    let new_height = (height as f64 * scale + 0.5) as u32;
    let resized = if scale > 1.0 {
        resize_lanczos(image, new_width, new_height)
    } else {
        resize_area(image, new_width, new_height).ok_or_else(|| Error::InvalidArgument {
            name: "bucket".into(),
            message: format!(
                "area resize of {width}x{height} to {new_width}x{new_height} is not a downscale"
            ),
        })?
    };
    if new_width < bucket_width || new_height < bucket_height {
        return Err(Error::InvalidArgument {
            name: "bucket".into(),
            message: format!(
                "{width}x{height} scaled to {new_width}x{new_height} does not cover {bucket_width}x{bucket_height}"
            ),
        });
    }
    let left = (new_width - bucket_width) / 2;
    let top = (new_height - bucket_height) / 2;
    Ok(image::imageops::crop_imm(&resized, left, top, bucket_width, bucket_height).to_image())
}

/// Musubi `BucketSelector.calculate_bucket_resolution`: the size of about `resolution`'s area with
/// the image's aspect ratio, both sides multiples of `steps`; of the five widths around
/// `sqrt(area * ar)` the first with the smallest aspect-ratio error wins.
pub fn calculate_bucket_resolution(
    image_size: (u32, u32),
    resolution: (u32, u32),
    steps: u32,
) -> (u32, u32) {
    let max_area = resolution.0 as u64 * resolution.1 as u64;
    let aspect_ratio = image_size.0 as f64 / image_size.1 as f64;
    let bucket_width = divisible_by((max_area as f64 * aspect_ratio).sqrt() as u32, steps);
    let bucket_height = divisible_by((max_area as f64 / aspect_ratio).sqrt() as u32, steps);
    let mut best = None;
    let mut best_difference = f64::INFINITY;
    for i in -2i64..=2 {
        let w = bucket_width as i64 + i * steps as i64;
        if w <= 0 {
            // Python would divide by zero or go negative here; no real image gets this far.
            continue;
        }
        let h = divisible_by((max_area / w as u64) as u32, steps);
        if h == 0 {
            continue;
        }
        let difference = (w as f64 / h as f64 - aspect_ratio).abs();
        if difference < best_difference {
            best_difference = difference;
            best = Some((w as u32, h));
        }
    }
    best.unwrap_or((bucket_width, bucket_height))
}

/// The dataset options that decide how control images are sized while caching.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ControlResize {
    /// `no_resize_control`.
    pub no_resize_control: bool,
    /// `control_resolution` as (width, height).
    pub control_resolution: Option<(u32, u32)>,
}

/// The size a control image of `control_size` is resized (and centre-cropped) to while caching an
/// item whose target bucket is `bucket`:
/// * neither option: the target bucket;
/// * `control_resolution` only: [`calculate_bucket_resolution`] of the control at that area;
/// * `no_resize_control` only: the control's own size floored to multiples of 16;
/// * both: as `no_resize_control`, unless the control's area exceeds the `control_resolution`
///   area, then as `control_resolution`.
pub fn control_resolution_for_caching(
    control_size: (u32, u32),
    bucket: (u32, u32),
    options: ControlResize,
) -> (u32, u32) {
    let own = (
        divisible_by(control_size.0, RESOLUTION_STEPS),
        divisible_by(control_size.1, RESOLUTION_STEPS),
    );
    match (options.no_resize_control, options.control_resolution) {
        (false, None) => bucket,
        (false, Some(resolution)) => {
            calculate_bucket_resolution(control_size, resolution, RESOLUTION_STEPS)
        }
        (true, None) => own,
        (true, Some(resolution)) => {
            let area = control_size.0 as u64 * control_size.1 as u64;
            if area > resolution.0 as u64 * resolution.1 as u64 {
                calculate_bucket_resolution(control_size, resolution, RESOLUTION_STEPS)
            } else {
                own
            }
        }
    }
}
