//! Strided f32 matrix products on the `gemm` crate's kernels, on host slices: no `contiguous`
//! copies (a transpose is a swap of strides), and products into new buffers written once (no zero
//! fill first). Used by the inference linear (f32) and by the direct backward (`train::direct`).

use crate::nn::host::WriteOnce;

/// A read-only strided view: element `(r, c)` is `data[r * row_stride + c * column_stride]`.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub columns: usize,
    pub row_stride: usize,
    pub column_stride: usize,
}

impl<'a> Matrix<'a> {
    /// `data` as a row-major `[rows, columns]` matrix.
    pub fn rows(data: &'a [f32], rows: usize, columns: usize) -> Self {
        Self::strided(data, rows, columns, columns)
    }

    /// Row-major `[rows, columns]` whose rows are `row_stride` apart (a column range of a wider
    /// matrix, starting at `data[0]`).
    pub fn strided(data: &'a [f32], rows: usize, columns: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            columns,
            row_stride,
            column_stride: 1,
        }
    }

    /// The transpose, as a view of the same memory.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.columns,
            columns: self.rows,
            row_stride: self.column_stride,
            column_stride: self.row_stride,
        }
    }

    /// Panics when the view reaches past its slice (the `gemm` call below reads raw pointers).
    fn check(&self) {
        if self.rows > 0 && self.columns > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.columns - 1) * self.column_stride;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// Whether a product of this many multiply-adds is worth splitting over the thread pool.
fn parallel_for(multiply_adds: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && multiply_adds >= 1 << 21 && rayon::current_thread_index().is_none() {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `out[r * out_stride + c] (+)= scale * (a b)[r, c]`; `accumulate` adds to what `out` holds.
/// Called from inside a parallel task it runs single-threaded.
pub fn multiply(
    out: &mut [f32],
    out_stride: usize,
    a: Matrix,
    b: Matrix,
    scale: f32,
    accumulate: bool,
) {
    if a.rows > 0 && b.columns > 0 {
        assert!(
            (a.rows - 1) * out_stride + b.columns <= out.len() && out_stride >= b.columns,
            "product output out of bounds"
        );
    }
    // SAFETY: the output rows lie inside `out` (checked above), which does not alias `a` or `b`
    // (a `&mut` borrow next to two shared ones).
    unsafe { multiply_raw(out.as_mut_ptr(), out_stride, a, b, scale, accumulate) }
}

/// `scale * a b` as a new row-major `[a.rows, b.columns]` vector, written once (no zero fill
/// first).
pub fn product(a: Matrix, b: Matrix, scale: f32) -> Vec<f32> {
    let mut out = WriteOnce::new(a.rows * b.columns);
    // SAFETY: the `[a.rows, b.columns]` rows (stride `b.columns`) are the new buffer's slots, which
    // alias nothing; without `accumulate` every one of them is written, and none is read.
    unsafe {
        multiply_raw(out.target().pointer(), b.columns, a, b, scale, false);
        out.assume_written()
    }
}

/// [`multiply`] through a raw output pointer.
///
/// # Safety
/// Rows `0 .. a.rows` of `b.columns` values, `out_stride` apart from `out`, are writable (and
/// initialised when `accumulate`), and alias neither operand.
unsafe fn multiply_raw(
    out: *mut f32,
    out_stride: usize,
    a: Matrix,
    b: Matrix,
    scale: f32,
    accumulate: bool,
) {
    assert_eq!(a.columns, b.rows, "inner dimensions differ");
    a.check();
    b.check();
    let (m, n, k) = (a.rows, b.columns, a.columns);
    if m == 0 || n == 0 {
        return;
    }
    assert!(out_stride >= n, "product output rows overlap");
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                // SAFETY: row `row` of the output is writable (the caller's guarantee).
                unsafe { std::ptr::write_bytes(out.add(row * out_stride), 0, n) };
            }
        }
        return;
    }
    // SAFETY: every index the views describe was checked to be in bounds above, the output's by
    // the caller; without `accumulate` the destination is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.column_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.column_stride as isize,
            b.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallel_for(m * n * k),
        );
    }
}
