//! Matrix products of f32 tensors whose operands are rounded to bf16 and multiplied on AMX tiles
//! with f32 accumulation: the products of bf16 mixed-precision training on the CPU, where the
//! activations stay f32 (see `bf16_weight_linear`). Same numbers as PyTorch's autocast, which
//! rounds both operands of a matmul to bf16, except that the result is not rounded.

use candle_core::{DType, Tensor};
use half::bf16;

use crate::nn::amx::{self, PackedB};
use crate::nn::fused::round_to_bf16;

pub(super) use crate::nn::fused::rounded_to_bf16 as rounded;

/// Rounds an f32 CPU tensor of `batch` matrices `[rows, columns]` to bf16, in the layout given by
/// `transposed`: `false`, row-major as the tensor reads; `true`, each matrix transposed (row-major
/// `[columns, rows]`). Returns the values and whether they were transposed. Contiguous tensors and
/// transposed views of contiguous ones are read in place; anything else is copied first.
fn rounded_matrices(
    tensor: &Tensor,
    batch: usize,
    rows: usize,
    columns: usize,
    transposed: bool,
) -> candle_core::Result<Vec<bf16>> {
    let rank = tensor.rank();
    let swapped = tensor.transpose(rank - 2, rank - 1)?;
    let (source, source_is_transposed) = if tensor.is_contiguous() {
        (tensor.clone(), false)
    } else if swapped.is_contiguous() {
        (swapped, true)
    } else {
        (tensor.contiguous()?, false)
    };
    let values = crate::nn::host::with_data(&source, |storage, offset| match storage {
        candle_core::CpuStorage::F32(values) => {
            let values = &values[offset..offset + batch * rows * columns];
            if source_is_transposed == transposed {
                return Ok(rounded(values));
            }
            // The stored matrices are the transposes of what is wanted: a blocked transpose.
            let (stored_rows, stored_columns) = if source_is_transposed {
                (columns, rows)
            } else {
                (rows, columns)
            };
            let mut out = crate::nn::fused::zeroed_bf16(values.len());
            const TILE: usize = 32;
            for (matrix, target) in values
                .chunks_exact(stored_rows * stored_columns)
                .zip(out.chunks_exact_mut(stored_rows * stored_columns))
            {
                for r0 in (0..stored_rows).step_by(TILE) {
                    for c0 in (0..stored_columns).step_by(TILE) {
                        for r in r0..(r0 + TILE).min(stored_rows) {
                            for c in c0..(c0 + TILE).min(stored_columns) {
                                target[c * stored_rows + r] =
                                    round_to_bf16(matrix[r * stored_columns + c]);
                            }
                        }
                    }
                }
            }
            Ok(out)
        }
        _ => Err(crate::error::Error::Shape(
            "bf16 products: expected f32 values".into(),
        )),
    });
    values.map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// Batched `a b` for `a` `[..., m, k]` and `b` `[..., k, n]` (same leading dims), f32 on the CPU,
/// with bf16-rounded operands; f32 `[..., m, n]`. Falls back to candle's matmul of the rounded
/// operands without AMX, and to a plain matmul for other dtypes or devices.
pub(super) fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 || !a.device().is_cpu() {
        return a.matmul(b);
    }
    if !amx::available() {
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        return round(a)?.matmul(&round(b)?);
    }
    let rank = a.rank();
    if rank < 2 || b.rank() != rank || a.dims()[..rank - 2] != b.dims()[..rank - 2] {
        candle_core::bail!(
            "bf16 products: shapes {:?} and {:?} do not multiply",
            a.dims(),
            b.dims()
        );
    }
    let (m, k) = (a.dims()[rank - 2], a.dims()[rank - 1]);
    let (k_b, n) = (b.dims()[rank - 2], b.dims()[rank - 1]);
    if k != k_b {
        candle_core::bail!("bf16 products: inner sizes {k} and {k_b} differ");
    }
    let batch: usize = a.dims()[..rank - 2].iter().product();
    let a_values = rounded_matrices(a, batch, m, k, false)?;
    // `B` packs fastest from `[n, k]` rows (pairs along `k` adjacent): take that layout when `b`
    // is the transpose of a contiguous tensor (`k^T`, `v^T`), row-major `[k, n]` otherwise.
    let b_transposed = b.transpose(rank - 2, rank - 1)?.is_contiguous() && !b.is_contiguous();
    let b_values = rounded_matrices(b, batch, k, n, b_transposed)?;
    let (k_stride, n_stride) = if b_transposed { (1, k) } else { (n, 1) };
    let mut out = vec![0f32; batch * m * n];
    for index in 0..batch {
        let packed = PackedB::new(&b_values[index * k * n..], k, n, k_stride, n_stride);
        amx::multiply(
            &a_values[index * m * k..],
            m,
            k,
            &packed,
            n,
            &mut out[index * m * n..(index + 1) * m * n],
            |v| v,
        );
    }
    let mut shape = a.dims().to_vec();
    shape[rank - 1] = n;
    Tensor::from_vec(out, shape, a.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::trainable::test_support::{random, relative_difference};

    /// Against f32 products of the rounded operands, for a plain and a transposed right operand.
    #[test]
    fn matches_f32_products_of_rounded_operands() -> crate::error::Result<()> {
        let round = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
        };
        let a = random(&[2, 3, 37, 20], 1, DType::F32)?;
        let b = random(&[2, 3, 20, 45], 2, DType::F32)?;
        let expected = round(&a)?.matmul(&round(&b)?)?;
        assert!(relative_difference(&matmul(&a, &b)?, &expected)? < 1e-5);
        let c = random(&[2, 3, 45, 20], 3, DType::F32)?;
        let expected = round(&a)?.matmul(&round(&c)?.t()?)?;
        assert!(relative_difference(&matmul(&a, &c.t()?)?, &expected)? < 1e-5);
        // A transposed left operand (read in place, transposed while rounding).
        let d = random(&[2, 3, 20, 37], 4, DType::F32)?;
        let expected = round(&d)?.t()?.matmul(&round(&b)?)?;
        assert!(relative_difference(&matmul(&d.t()?, &b)?, &expected)? < 1e-5);
        Ok(())
    }
}
