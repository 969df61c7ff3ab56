//! PNG output with text chunks (the generation parameters), written atomically.

use std::path::Path;

use image::RgbImage;

use crate::checkpoint::write_atomically;
use crate::error::{Error, Result};

/// Writes `image` as an 8-bit RGB PNG with one text chunk per `(keyword, text)` pair: `tEXt` when
/// the text is Latin-1, `iTXt` (UTF-8) otherwise. The file appears complete or not at all.
pub fn write_png(path: &Path, image: &RgbImage, text: &[(String, String)]) -> Result<()> {
    for (keyword, _) in text {
        if keyword.is_empty()
            || keyword.len() > 79
            || !keyword.chars().all(|c| (' '..='~').contains(&c))
        {
            return Err(Error::Image {
                path: path.to_path_buf(),
                message: format!(
                    "PNG text keyword `{keyword}` must be 1 to 79 printable ASCII characters"
                ),
            });
        }
    }
    write_atomically(path, |writer| {
        let mut encoder = png::Encoder::new(writer, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (keyword, value) in text {
            let latin1 = value.chars().all(|c| (c as u32) < 256);
            let added = if latin1 {
                encoder.add_text_chunk(keyword.clone(), value.clone())
            } else {
                encoder.add_itxt_chunk(keyword.clone(), value.clone())
            };
            added.map_err(std::io::Error::other)?;
        }
        let mut png = encoder.write_header().map_err(std::io::Error::other)?;
        png.write_image_data(image.as_raw())
            .map_err(std::io::Error::other)?;
        png.finish().map_err(std::io::Error::other)
    })
}

/// The text chunks (`tEXt`, `zTXt`, `iTXt`) of a PNG file, in file order.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, "cannot open PNG", e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: format!("not a readable PNG: {e}"),
    })?;
    // Text chunks may follow the image data: read to the end.
    let size = reader.output_buffer_size().unwrap_or(0);
    let mut buffer = vec![0; size];
    reader.next_frame(&mut buffer).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: format!("cannot decode PNG: {e}"),
    })?;
    reader.finish().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: format!("cannot read PNG trailer: {e}"),
    })?;
    let info = reader.info();
    let mut text = Vec::new();
    for chunk in &info.uncompressed_latin1_text {
        text.push((chunk.keyword.clone(), chunk.text.clone()));
    }
    for chunk in &info.compressed_latin1_text {
        let value = chunk.get_text().map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: format!("bad zTXt chunk `{}`: {e}", chunk.keyword),
        })?;
        text.push((chunk.keyword.clone(), value));
    }
    for chunk in &info.utf8_text {
        let value = chunk.get_text().map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: format!("bad iTXt chunk `{}`: {e}", chunk.keyword),
        })?;
        text.push((chunk.keyword.clone(), value));
    }
    Ok(text)
}
