//! The 2x2 patchify that turns the AE's 32-channel latents into the DiT's 128 channels (einops
//! `c (i pi) (j pj) -> (c pi pj) i j`, channel index `c*4 + pi*2 + pj`), and its inverse.

use candle_core::Tensor;

use super::config::PATCH_SIZE;
use crate::error::{Error, Result};

/// [b, c, 2h, 2w] -> [b, 4c, h, w].
pub fn patchify(x: &Tensor) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4()?;
    let p = PATCH_SIZE;
    if height % p != 0 || width % p != 0 {
        return Err(Error::Shape(format!(
            "cannot patchify latents of size {height}x{width}: both sides must be even"
        )));
    }
    let (h, w) = (height / p, width / p);
    Ok(x.reshape((batch, channels, h, p, w, p))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((batch, channels * p * p, h, w))?)
}

/// [b, 4c, h, w] -> [b, c, 2h, 2w], the exact inverse of [`patchify`].
pub fn unpatchify(x: &Tensor) -> Result<Tensor> {
    let (batch, channels, h, w) = x.dims4()?;
    let p = PATCH_SIZE;
    if channels % (p * p) != 0 {
        return Err(Error::Shape(format!(
            "cannot unpatchify {channels} latent channels: not a multiple of {}",
            p * p
        )));
    }
    let c = channels / (p * p);
    Ok(x.reshape((batch, c, p, p, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((batch, c, h * p, w * p))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn channel_index_is_c4_plus_dy2_plus_dx() -> Result<()> {
        // x[0, c, y, x] = 1000c + 10y + x, two channels on a 4x6 grid.
        let values: Vec<f32> = (0..2)
            .flat_map(|c| {
                (0..4).flat_map(move |y| (0..6).map(move |x| (1000 * c + 10 * y + x) as f32))
            })
            .collect();
        let x = Tensor::from_vec(values, (1, 2, 4, 6), &Device::Cpu)?;
        let p = patchify(&x)?;
        assert_eq!(p.dims(), &[1, 8, 2, 3]);
        let p = patchify(&x)?.squeeze(0)?.to_vec3::<f32>()?;
        for (channel, plane) in p.iter().enumerate() {
            let (c, dy, dx) = (channel / 4, (channel / 2) % 2, channel % 2);
            for (i, row) in plane.iter().enumerate() {
                for (j, &value) in row.iter().enumerate() {
                    let expected = (1000 * c + 10 * (2 * i + dy) + 2 * j + dx) as f32;
                    assert_eq!(value, expected, "channel {channel} at ({i}, {j})");
                }
            }
        }
        assert_eq!(p.len(), 8);
        Ok(())
    }

    #[test]
    fn unpatchify_inverts_patchify() -> Result<()> {
        let x = Tensor::arange(0f32, 96.0, &Device::Cpu)?.reshape((1, 2, 4, 12))?;
        let back = unpatchify(&patchify(&x)?)?;
        let difference = (back - &x)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(difference, 0.0);
        Ok(())
    }
}
