//! Reading an image file into 8-bit RGB the way Musubi's datasets see it, with EXIF orientation
//! applied first.

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::error::{Error, Result};

fn image_error(path: &Path, what: &str, error: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        message: format!("{what}: {error}"),
    }
}

/// Reads a PNG, JPEG or WebP file (format from its content, not its name) as 8-bit RGB.
///
/// * The EXIF orientation, when present, is applied (rotations/flips), as a photo viewer shows it.
/// * RGBA loses its alpha channel without compositing, as Musubi does (`cc[..., :3]`).
/// * Greyscale becomes R = G = B.
/// * 16-bit samples become 8-bit by rounding `v / 257` (Pillow would keep the high byte for RGB
///   and clip greyscale values above 255; neither is reproduced).
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, "cannot open image", e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, "cannot read image", e))?;
    if reader.format().is_none() {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: "not a PNG, JPEG or WebP image (unrecognised content)".into(),
        });
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| image_error(path, "cannot decode image", e))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| image_error(path, "cannot read the EXIF orientation", e))?;
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(|e| image_error(path, "cannot decode image", e))?;
    image.apply_orientation(orientation);
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: "the image is empty (0 pixels)".into(),
        });
    }
    Ok(image.to_rgb8())
}
