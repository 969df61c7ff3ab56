//! Conversion between 8-bit RGB images and the AE's [-1, 1] tensors: Musubi's `x / 127.5 - 1` in,
//! and `clamp((x + 1) / 2, 0, 1) * 255` truncated to u8 out (Musubi `save_images_grid`).

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::error::{Error, Result};

/// An RGB image to a [1, 3, H, W] f32 tensor in [-1, 1].
pub fn image_to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let values: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    let tensor = Tensor::from_vec(values, (height, width, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?;
    Ok(tensor.to_device(device)?)
}

/// A [1, 3, H, W] or [3, H, W] tensor in [-1, 1] (values outside are clamped) to an RGB image.
pub fn tensor_to_image(tensor: &Tensor) -> Result<RgbImage> {
    let tensor = match tensor.rank() {
        4 if tensor.dim(0)? == 1 => tensor.squeeze(0)?,
        3 => tensor.clone(),
        _ => {
            return Err(Error::Shape(format!(
                "an image tensor must be [1, 3, H, W] or [3, H, W], got {:?}",
                tensor.dims()
            )))
        }
    };
    let (channels, height, width) = tensor.dims3()?;
    if channels != 3 {
        return Err(Error::Shape(format!(
            "an image tensor must have 3 channels, got {:?}",
            tensor.dims()
        )));
    }
    let values = tensor
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes = values
        .iter()
        .map(|&v| ((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0)
        .map(|v| v as u8)
        .collect();
    RgbImage::from_raw(width as u32, height as u32, bytes)
        .ok_or_else(|| Error::Shape("image buffer size mismatch".into()))
}
