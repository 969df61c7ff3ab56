//! Matrix products of the direct backward on host slices: the strided f32 products of
//! [`crate::nn::matrix`], and the products with a frozen base weight, f32 or bf16 (bf16 mixed
//! precision: both operands rounded to bf16, AMX tiles with f32 accumulation, as
//! `nn::trainable::bf16_weight_linear`).

use half::bf16;

use crate::nn::amx::{self, PackedB};
use crate::nn::fused::round_to_bf16;
use crate::nn::host::update_each;

pub(super) use crate::nn::matrix::{multiply, product, Matrix};

pub(super) use crate::nn::fused::rounded_to_bf16 as to_bf16;

/// `values` rounded to the nearest bf16, kept as f32 (exact products of such values in f32 are
/// the products AMX computes).
pub(super) fn round_in_place(values: &mut [f32]) {
    update_each(
        values,
        #[inline(always)]
        |v| *v = round_to_bf16(*v).to_f32(),
    );
}

/// A frozen base weight `[out, in]` (row-major) in host memory.
#[derive(Clone, Copy)]
pub(super) enum FrozenWeight<'a> {
    F32(&'a [f32]),
    /// bf16 mixed precision: activations are rounded to bf16 for the products.
    Bf16(&'a [bf16]),
}

impl FrozenWeight<'_> {
    /// `y = x W^T` `[rows, out]` for `x` `[rows, in]`, as a new vector.
    pub fn forward(
        &self,
        x: &[f32],
        rows: usize,
        in_features: usize,
        out_features: usize,
    ) -> Vec<f32> {
        match self {
            Self::F32(weight) => product(
                Matrix::rows(x, rows, in_features),
                Matrix::rows(weight, out_features, in_features).t(),
                1.0,
            ),
            // Element (i, o) of W^T is W[o, i].
            Self::Bf16(weight) => bf16_product(x, rows, in_features, weight, false, out_features),
        }
    }

    /// `dx = dy W` `[rows, in]` for `dy` `[rows, out]`, as a new vector (written once: the
    /// callers then add the LoRA terms to it).
    pub fn backward(
        &self,
        dy: &[f32],
        rows: usize,
        out_features: usize,
        in_features: usize,
    ) -> Vec<f32> {
        match self {
            Self::F32(weight) => product(
                Matrix::rows(dy, rows, out_features),
                Matrix::rows(weight, out_features, in_features),
                1.0,
            ),
            // `W` itself is the `[k, n]` = `[out, in]` operand.
            Self::Bf16(weight) => bf16_product(dy, rows, out_features, weight, true, in_features),
        }
    }
}

/// `round(a) B` as a new `[rows, n]` vector, with `B` the bf16 weight as `[k, n]`
/// (`weight_is_k_by_n`: `W` itself, `[out, in]` = `[k, n]`; else `W^T`). On AMX tiles when
/// available; otherwise both operands are widened to f32 and multiplied by `gemm`.
fn bf16_product(
    a: &[f32],
    rows: usize,
    k: usize,
    weight: &[bf16],
    weight_is_k_by_n: bool,
    n: usize,
) -> Vec<f32> {
    let a_rounded = to_bf16(&a[..rows * k]);
    if amx::available() {
        let packed = if weight_is_k_by_n {
            PackedB::new(weight, k, n, n, 1)
        } else {
            PackedB::new(weight, k, n, 1, k)
        };
        if let Some(out) = amx::product(&a_rounded, rows, k, &packed, n, |v| v) {
            return out;
        }
    }
    let (a, b) = widened(&a_rounded, rows, k, weight, weight_is_k_by_n, n);
    product(a.matrix(), b.matrix(), 1.0)
}

/// A row-major f32 matrix that owns its values.
struct Owned {
    values: Vec<f32>,
    rows: usize,
    columns: usize,
    transposed: bool,
}

impl Owned {
    fn matrix(&self) -> Matrix<'_> {
        let view = Matrix::rows(&self.values, self.rows, self.columns);
        if self.transposed {
            view.t()
        } else {
            view
        }
    }
}

/// The bf16 operands of a product widened to f32, for CPUs without AMX: `a` `[rows, k]` and the
/// weight as the `[k, n]` operand (see [`bf16_product`]).
fn widened(
    a: &[bf16],
    rows: usize,
    k: usize,
    weight: &[bf16],
    weight_is_k_by_n: bool,
    n: usize,
) -> (Owned, Owned) {
    let a = Owned {
        values: a.iter().map(|v| v.to_f32()).collect(),
        rows,
        columns: k,
        transposed: false,
    };
    let values = weight[..k * n].iter().map(|v| v.to_f32()).collect();
    let b = if weight_is_k_by_n {
        Owned {
            values,
            rows: k,
            columns: n,
            transposed: false,
        }
    } else {
        Owned {
            values,
            rows: n,
            columns: k,
            transposed: true,
        }
    };
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SeededRng;

    fn random(count: usize, seed: u64) -> Vec<f32> {
        let mut rng = SeededRng::new(seed);
        (0..count).map(|_| rng.normal() as f32).collect()
    }

    /// `a b` summed in f64 from views, as the reference.
    fn naive(a: Matrix, b: Matrix) -> Vec<f64> {
        let at = |m: &Matrix, r: usize, c: usize| m.data[r * m.row_stride + c * m.column_stride];
        let mut out = vec![0f64; a.rows * b.columns];
        for r in 0..a.rows {
            for c in 0..b.columns {
                out[r * b.columns + c] = (0..a.columns)
                    .map(|i| at(&a, r, i) as f64 * at(&b, i, c) as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_products_match_a_naive_sum() {
        let (m, k, n) = (7, 13, 5);
        // `a` is the left 13 columns of a [7, 20] matrix; `b` is read transposed.
        let a_data = random(m * 20, 1);
        let b_data = random(n * k, 2);
        let a = Matrix::strided(&a_data, m, k, 20);
        let b = Matrix::rows(&b_data, n, k).t();
        let expected = naive(a, b);
        let mut out = vec![1f32; m * 9];
        multiply(&mut out, 9, a, b, 0.5, true);
        for r in 0..m {
            for c in 0..n {
                let want = 1.0 + 0.5 * expected[r * n + c];
                assert!((out[r * 9 + c] as f64 - want).abs() < 1e-5);
            }
            // Columns past `n` are left alone.
            assert!(out[r * 9 + n..r * 9 + 9].iter().all(|&v| v == 1.0));
        }
    }

    /// The CPU fallback without AMX: the widened operands, in both orientations of the weight,
    /// multiplied by `product`, equal the f64 sums.
    #[test]
    fn widened_bf16_operands_match_a_naive_sum() {
        let (rows, k, n) = (9, 21, 13);
        let a: Vec<bf16> = random(rows * k, 11)
            .iter()
            .map(|&v| round_to_bf16(v))
            .collect();
        let weight: Vec<bf16> = random(k * n, 12)
            .iter()
            .map(|&v| round_to_bf16(v))
            .collect();
        let a_wide: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
        let weight_wide: Vec<f32> = weight.iter().map(|v| v.to_f32()).collect();
        for weight_is_k_by_n in [true, false] {
            let (a_owned, b_owned) = widened(&a, rows, k, &weight, weight_is_k_by_n, n);
            let got = product(a_owned.matrix(), b_owned.matrix(), 0.5);
            let b = if weight_is_k_by_n {
                Matrix::rows(&weight_wide, k, n)
            } else {
                Matrix::rows(&weight_wide, n, k).t()
            };
            let expected = naive(Matrix::rows(&a_wide, rows, k), b);
            assert_eq!(got.len(), rows * n);
            for (got, want) in got.iter().zip(&expected) {
                assert!((*got as f64 - 0.5 * want).abs() < 1e-5 * (1.0 + want.abs()));
            }
        }
    }

    #[test]
    fn bf16_weight_products_use_rounded_operands() {
        let (rows, in_features, out_features) = (37, 70, 45);
        let x = random(rows * in_features, 3);
        let weight: Vec<bf16> = random(out_features * in_features, 4)
            .iter()
            .map(|&v| round_to_bf16(v))
            .collect();
        let mut rounded_x = x.clone();
        round_in_place(&mut rounded_x);
        let weight_wide: Vec<f32> = weight.iter().map(|v| v.to_f32()).collect();
        let frozen = FrozenWeight::Bf16(&weight);
        let y = frozen.forward(&x, rows, in_features, out_features);
        assert_eq!(y.len(), rows * out_features);
        let expected = naive(
            Matrix::rows(&rounded_x, rows, in_features),
            Matrix::rows(&weight_wide, out_features, in_features).t(),
        );
        for (got, want) in y.iter().zip(&expected) {
            assert!((*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
        }
        let dy = random(rows * out_features, 5);
        let mut rounded_dy = dy.clone();
        round_in_place(&mut rounded_dy);
        let dx = frozen.backward(&dy, rows, out_features, in_features);
        assert_eq!(dx.len(), rows * in_features);
        let expected = naive(
            Matrix::rows(&rounded_dy, rows, out_features),
            Matrix::rows(&weight_wide, out_features, in_features),
        );
        for (got, want) in dx.iter().zip(&expected) {
            assert!((*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
        }
    }
}
