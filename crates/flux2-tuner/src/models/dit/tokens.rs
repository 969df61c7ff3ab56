//! Packing latents into tokens and the `(t, h, w, l)` position ids of text, image and reference
//! tokens (BFL `prc_img`, `prc_txt`, `encode_image_refs`).

use candle_core::{Device, Tensor};

use crate::error::Result;

/// The time coordinate of the k-th reference image (10, 20, 30, ...).
pub fn reference_time_coordinate(index: usize) -> i64 {
    10 + 10 * index as i64
}

/// `[b, c, h, w]` latents to `[b, h * w, c]` tokens, token index `row * w + col`.
pub fn pack_latents(latents: &Tensor) -> Result<Tensor> {
    let (batch, channels, height, width) = latents.dims4()?;
    Ok(latents
        .reshape((batch, channels, height * width))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[b, h * w, c]` tokens back to `[b, c, h, w]` latents.
pub fn unpack_tokens(tokens: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (batch, _, channels) = tokens.dims3()?;
    Ok(tokens
        .transpose(1, 2)?
        .reshape((batch, channels, height, width))?
        .contiguous()?)
}

/// Ids `(t, row, col, 0)` of an `h x w` image grid, row-major, repeated for the batch: `[b, h*w, 4]`.
pub fn image_position_ids(
    batch: usize,
    height: usize,
    width: usize,
    t: i64,
    device: &Device,
) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(batch * height * width * 4);
    for _ in 0..batch {
        for row in 0..height {
            for col in 0..width {
                ids.extend_from_slice(&[t, row as i64, col as i64, 0]);
            }
        }
    }
    Ok(Tensor::from_vec(ids, (batch, height * width, 4), device)?)
}

/// Ids `(0, 0, 0, i)` of `length` text tokens: `[b, length, 4]`.
pub fn text_position_ids(batch: usize, length: usize, device: &Device) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(batch * length * 4);
    for _ in 0..batch {
        for i in 0..length {
            ids.extend_from_slice(&[0, 0, 0, i as i64]);
        }
    }
    Ok(Tensor::from_vec(ids, (batch, length, 4), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_is_row_major_and_reversible() -> Result<()> {
        let device = Device::Cpu;
        let latents =
            Tensor::arange(0f32, 2.0 * 3.0 * 2.0 * 3.0, &device)?.reshape((2, 3, 2, 3))?;
        let tokens = pack_latents(&latents)?;
        assert_eq!(tokens.dims(), &[2, 6, 3]);
        // Token (row 1, col 2) = index 5 holds channel c at latents[b, c, 1, 2].
        let token: Vec<f32> = tokens.get(0)?.get(5)?.to_vec1()?;
        assert_eq!(token, vec![5.0, 11.0, 17.0]);
        let back = unpack_tokens(&tokens, 2, 3)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            latents.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn ids_follow_the_reference_layout() -> Result<()> {
        let device = Device::Cpu;
        let ids: Vec<i64> = image_position_ids(1, 2, 2, reference_time_coordinate(1), &device)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(
            ids,
            vec![20, 0, 0, 0, 20, 0, 1, 0, 20, 1, 0, 0, 20, 1, 1, 0]
        );
        let text: Vec<i64> = text_position_ids(1, 2, &device)?.flatten_all()?.to_vec1()?;
        assert_eq!(text, vec![0, 0, 0, 0, 0, 0, 0, 1]);
        Ok(())
    }
}
