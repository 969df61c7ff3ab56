//! Scaled dot-product attention without a mask (FLUX.2 joint attention).
//!
//! Two ways: for inference on the CPU (no gradient recorded) a fused kernel that walks 32 query rows
//! at a time through scores, softmax and the value product without materialising the score matrix
//! (f32 through the `gemm` crate, bf16 on AMX tiles when the CPU has them); otherwise candle ops,
//! chunked over queries so that the score matrix never exceeds a fixed size.

use candle_core::{CpuStorage, DType, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use std::cell::RefCell;

use crate::nn::amx::{self, PackedB, ResultBlock, Tiles, BLOCK_COLUMNS, BLOCK_ROWS};
use crate::nn::amx_layout::{pack_rows, row_block_words, AlignedWords};
use crate::nn::fused::round_to_bf16;
use crate::nn::host::{
    is_plain_cpu, vectorised, with_data, with_f32_scratch, SharedOutput, WriteOnce,
};
use crate::nn::softmax::{exp, shifted_exp};
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest number of score elements (`batch * heads * query_rows * keys`) computed at once on the
/// candle path.
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// Query rows per task of the f32 kernel: each task's `gemm` calls pack the head's `K^T` and `V`
/// again, so more rows per task spread that packing over more products; 384 rows of 1152 keys
/// keep the scores (1.7 MiB) in a 2 MiB L2. Against 128 rows: 0.91, 0.96 and 0.99 of the f32
/// forward's time in three paired A/B runs.
const F32_BLOCK_ROWS: usize = 384;

/// `softmax(q k^T / sqrt(d)) v`, the softmax in f32.
///
/// # Shapes
/// `q`, `k`, `v`: `[b, heads, l, d]`; returns `[b, l, heads * d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    // `--attn_mode flash` with bf16 on CUDA: the fused kernel (records its own backward).
    if crate::nn::flash::applies_to(q) {
        return crate::nn::flash::attention(q, k, v);
    }
    if crate::nn::grad_mode::enabled() {
        return crate::nn::trainable::attention(q, k, v);
    }
    let same_dtype = q.dtype() == k.dtype() && k.dtype() == v.dtype();
    if same_dtype && is_plain_cpu(&[q, k, v]) {
        match q.dtype() {
            DType::F32 => return fused_f32(q, k, v),
            DType::BF16 if amx::available() => return fused_bf16(q, k, v),
            _ => {}
        }
    }
    attention_by_ops(q, k, v)
}

/// Checks that `k` and `v` are `[b, heads, keys, d]` for `q` `[b, heads, l, d]` and that all three
/// share one dtype; `kernel` names the caller in the error.
pub fn check_qkv(kernel: &str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let (batch, heads, _, head_dim) = q.dims4()?;
    let keys = k.dim(2)?;
    for (name, tensor) in [("k", k), ("v", v)] {
        if tensor.dims() != [batch, heads, keys, head_dim] {
            return Err(Error::Shape(format!(
                "{kernel}: {name} has shape {:?}, expected [{batch}, {heads}, {keys}, {head_dim}] for q {:?}",
                tensor.dims(),
                q.dims()
            )));
        }
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return Err(Error::Shape(format!(
            "{kernel}: q, k, v have dtypes {:?}, {:?}, {:?}, expected one dtype",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )));
    }
    Ok(())
}

/// As [`attention`] inside a model whose weights are `weight_dtype`: while training a bf16 model on
/// the CPU the activations are f32 (`Flux2Dit::activation_dtype`), and the attention's products
/// then round their operands to bf16 as the model's own matmuls do.
pub fn attention_in_model(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    weight_dtype: DType,
) -> Result<Tensor> {
    let mixed = weight_dtype == DType::BF16 && q.dtype() == DType::F32 && q.device().is_cpu();
    if mixed && crate::nn::grad_mode::enabled() {
        return crate::nn::trainable::attention_with_bf16_products(q, k, v);
    }
    attention(q, k, v)
}

/// The candle-op path (records gradients; any device and dtype).
fn attention_by_ops(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (batch, heads, length, head_dim) = q.dims4()?;
    let keys = k.dim(2)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let k_t = k.t()?;
    let rows_per_chunk =
        (MAX_SCORE_ELEMENTS / (batch * heads * keys).max(1)).clamp(1, length.max(1));
    let mut outputs = Vec::new();
    let mut start = 0;
    while start < length {
        let rows = rows_per_chunk.min(length - start);
        let q_chunk = q.narrow(2, start, rows)?;
        let scores = (q_chunk.matmul(&k_t)?.to_dtype(DType::F32)? * scale)?;
        let probabilities = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        outputs.push(probabilities.matmul(v)?);
        start += rows;
    }
    let out = if outputs.len() == 1 {
        outputs.remove(0)
    } else {
        Tensor::cat(&outputs, 2)?
    };
    Ok(out
        .transpose(1, 2)?
        .reshape((batch, length, heads * head_dim))?)
}

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Shapes {
    batch: usize,
    heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
}

impl Shapes {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (batch, heads, queries, head_dim) = q.dims4()?;
        let keys = k.dim(2)?;
        if k.dims() != [batch, heads, keys, head_dim] || v.dims() != k.dims() {
            return Err(Error::Shape(format!(
                "attention: q {:?}, k {:?} and v {:?} do not agree",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        }
        Ok(Self {
            batch,
            heads,
            queries,
            keys,
            head_dim,
        })
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn query_blocks(&self) -> usize {
        self.queries.div_ceil(BLOCK_ROWS)
    }

    /// Blocks of `F32_BLOCK_ROWS` queries.
    fn f32_query_blocks(&self) -> usize {
        self.queries.div_ceil(F32_BLOCK_ROWS)
    }

    /// Index in the `[b, l, heads * d]` output of element `j` of query `row` of head `bh`.
    fn output_index(&self, bh: usize, row: usize, j: usize) -> usize {
        let (batch, head) = (bh / self.heads, bh % self.heads);
        ((batch * self.queries + row) * self.heads + head) * self.head_dim + j
    }
}

fn bf16_data(storage: &CpuStorage) -> Result<&[bf16]> {
    match storage {
        CpuStorage::BF16(values) => Ok(values),
        _ => Err(Error::Shape("attention: expected bf16 data".into())),
    }
}

fn f32_data(storage: &CpuStorage) -> Result<&[f32]> {
    match storage {
        CpuStorage::F32(values) => Ok(values),
        _ => Err(Error::Shape("attention: expected f32 data".into())),
    }
}

/// Calls `f` with the contiguous data of q, k and v.
fn with_qkv<R>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(&CpuStorage, &CpuStorage, &CpuStorage) -> Result<R>,
) -> Result<R> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    with_data(&q, |qs, qo| {
        with_data(&k, |ks, ko| {
            with_data(&v, |vs, vo| {
                // Offsets are zero for freshly made contiguous tensors; anything else is a bug here.
                if qo != 0 || ko != 0 || vo != 0 {
                    return Err(Error::Shape("attention: offset tensor views".into()));
                }
                f(qs, ks, vs)
            })
        })
    })
}

/// bf16 attention on AMX tiles: scores in f32, `exp` in f32 rounded once to bf16, the value
/// product accumulated in f32, divided by the row sum and rounded once (the order of flash
/// attention kernels: unnormalised weights, one division per output).
///
/// Per head and block of 32 queries: `q k^T` block by block (keeping each row's maximum), one
/// pass writing the rounded `exp` straight into the tile layout of the value product's left
/// operand, and the value product written into the `[b, l, heads * d]` output.
fn fused_bf16(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let shapes = Shapes::of(q, k, v)?;
    let Shapes {
        keys,
        head_dim,
        queries,
        ..
    } = shapes;
    let pairs = shapes.batch * shapes.heads;
    let mut out = WriteOnce::new(pairs * queries * head_dim);
    let target = out.target();
    let unconfigured = AtomicBool::new(false);
    with_qkv(q, k, v, |qs, ks, vs| {
        let (qs, ks, vs) = (bf16_data(qs)?, bf16_data(ks)?, bf16_data(vs)?);
        let head = keys * head_dim;
        // Per head: K^T `[d, keys]` and V `[keys, d]` in tile layout.
        let packed: Vec<(PackedB, PackedB)> = (0..pairs)
            .into_par_iter()
            .map(|bh| {
                let (k_head, v_head) = (&ks[bh * head..], &vs[bh * head..]);
                (
                    PackedB::new(k_head, head_dim, keys, 1, head_dim),
                    PackedB::new(v_head, keys, head_dim, head_dim, 1),
                )
            })
            .collect();
        let scale = shapes.scale();
        (0..pairs * shapes.query_blocks())
            .into_par_iter()
            .for_each(|task| {
                let (bh, block) = (task / shapes.query_blocks(), task % shapes.query_blocks());
                let (packed_k, packed_v) = &packed[bh];
                let Some(tiles) = Tiles::configure() else {
                    unconfigured.store(true, Ordering::Relaxed);
                    return;
                };
                let first = block * BLOCK_ROWS;
                let task = QueryBlock {
                    shapes,
                    bh,
                    first,
                    rows: (queries - first).min(BLOCK_ROWS),
                    queries: &qs[(bh * queries + first) * head_dim..],
                    packed_k,
                    packed_v,
                    scale,
                    target,
                };
                let mut result = ResultBlock::new();
                let (query_depth, weight_depth) = (packed_k.depth_blocks, packed_v.depth_blocks);
                let score_words = BLOCK_ROWS * packed_k.padded_columns();
                with_operand_scratch(
                    query_depth,
                    weight_depth,
                    score_words,
                    |query, weights, scores| {
                        // The thread-local scratch is taken outside: `vectorised` inlines only what
                        // is inside it.
                        vectorised(
                            #[inline(always)]
                            || task.run(&tiles, query, weights, scores, &mut result),
                        )
                    },
                );
            });
        Ok(())
    })?;
    if unconfigured.load(Ordering::Relaxed) {
        return Err(Error::Shape(
            "bf16 attention: the AMX tiles could not be configured on a worker thread".into(),
        ));
    }
    // SAFETY: every task configured its tiles (checked above) and wrote the head_dim columns of
    // its query rows of its head; the tasks cover every (sample, head, query).
    let out = unsafe { out.assume_written() };
    Ok(Tensor::from_vec(
        out,
        (shapes.batch, queries, shapes.heads * head_dim),
        q.device(),
    )?)
}

/// One task of [`fused_bf16`]: a block of up to 32 queries of one head.
struct QueryBlock<'a> {
    shapes: Shapes,
    /// Sample and head, `batch * heads + head`.
    bh: usize,
    first: usize,
    rows: usize,
    /// The head's query rows from `first` on, `[.., d]`.
    queries: &'a [bf16],
    packed_k: &'a PackedB,
    packed_v: &'a PackedB,
    scale: f32,
    target: SharedOutput<bf16>,
}

impl QueryBlock<'_> {
    #[inline(always)]
    fn run(
        &self,
        tiles: &Tiles,
        query: &mut AlignedWords,
        weights: &mut AlignedWords,
        scores: &mut AlignedWords,
        result: &mut ResultBlock,
    ) {
        let Shapes { keys, head_dim, .. } = self.shapes;
        let (rows, width) = (self.rows, self.packed_k.padded_columns());
        let depth = self.packed_k.depth_blocks;
        pack_rows(
            self.queries,
            rows,
            head_dim,
            head_dim,
            depth,
            query.as_bf16_mut(),
        );
        tiles.row_block_into(query.as_slice(), self.packed_k, scores.as_f32_mut(), width);
        let scores = scores.as_f32_mut();
        let mut maxima = [f32::NEG_INFINITY; BLOCK_ROWS];
        for (maximum, row) in maxima.iter_mut().zip(scores.chunks_exact(width)).take(rows) {
            let mut lanes = [f32::NEG_INFINITY; LANES];
            lane_maxima(&row[..keys], &mut lanes);
            *maximum = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| larger(m, v));
        }
        let mut sums = [0f32; BLOCK_ROWS];
        let packed_weights = weights.as_bf16_mut();
        for (r, sum) in sums.iter_mut().enumerate() {
            let row = (r < rows).then(|| &scores[r * width..][..keys]);
            *sum = exp_into_tiles(row, maxima[r], self.scale, r, packed_weights);
        }
        let inverse = sums.map(|sum| 1.0 / sum);
        tiles.row_block_products(
            weights.as_slice(),
            self.packed_v,
            result,
            #[inline(always)]
            |column, block| {
                let valid = head_dim.saturating_sub(column).min(BLOCK_COLUMNS);
                for (r, &scale) in inverse.iter().enumerate().take(rows) {
                    let start = self.shapes.output_index(self.bh, self.first + r, column);
                    for (j, &value) in block[r * BLOCK_COLUMNS..][..valid].iter().enumerate() {
                        // SAFETY: each (bh, row, j) belongs to exactly one task; the index is in
                        // bounds.
                        unsafe { self.target.write(start + j, round_to_bf16(value * scale)) };
                    }
                }
            },
        );
    }
}

thread_local! {
    /// Packed query rows, packed attention weights and scores of the running task.
    static OPERANDS: RefCell<(AlignedWords, AlignedWords, AlignedWords)> = RefCell::new(Default::default());
}

/// Calls `f` with this thread's aligned scratch for one packed row block of queries (depth
/// `query_depth` tiles), one of attention weights (`weight_depth` tiles) and `score_words` f32
/// scores. Stale contents.
fn with_operand_scratch<R>(
    query_depth: usize,
    weight_depth: usize,
    score_words: usize,
    f: impl FnOnce(&mut AlignedWords, &mut AlignedWords, &mut AlignedWords) -> R,
) -> R {
    OPERANDS.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let (query, weights, scores) = &mut *scratch;
        query.resize(row_block_words(query_depth));
        weights.resize(row_block_words(weight_depth));
        scores.resize(score_words);
        f(query, weights, scores)
    })
}

/// f32 lanes of one AVX-512 register.
const LANES: usize = 16;

/// `a.max(b)` for values that are not NaN, as one `vmaxps` (`f32::max` adds NaN handling).
#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Folds `values` into the running maxima `lanes` (element `i` into lane `i % 16`).
#[inline(always)]
fn lane_maxima(values: &[f32], lanes: &mut [f32; LANES]) {
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = larger(*lane, v);
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane = larger(*lane, v);
    }
}

/// Writes `exp(scale (score - maximum))` of one row of scores, rounded to bf16, as row `r` of a
/// packed row block of attention weights (zero past the keys; all zero for `None`, a row past the
/// queries). Returns the sum of the unrounded values.
#[inline(always)]
fn exp_into_tiles(
    scores: Option<&[f32]>,
    maximum: f32,
    scale: f32,
    r: usize,
    packed: &mut [bf16],
) -> f32 {
    let depth_blocks = packed.len() / (BLOCK_ROWS * BLOCK_COLUMNS);
    let slot = |d: usize| (d * 2 + r / 16) * 512 + (r % 16) * BLOCK_COLUMNS;
    let Some(scores) = scores else {
        for d in 0..depth_blocks {
            packed[slot(d)..][..BLOCK_COLUMNS].fill(bf16::ZERO);
        }
        return 1.0;
    };
    let mut sums = [0f32; BLOCK_COLUMNS];
    for d in 0..depth_blocks {
        let target = &mut packed[slot(d)..][..BLOCK_COLUMNS];
        let chunk = &scores[(d * BLOCK_COLUMNS).min(scores.len())..];
        if chunk.len() >= BLOCK_COLUMNS {
            for ((t, &s), sum) in target
                .iter_mut()
                .zip(&chunk[..BLOCK_COLUMNS])
                .zip(&mut sums)
            {
                let value = exp((s - maximum) * scale);
                *sum += value;
                *t = round_to_bf16(value);
            }
        } else {
            for (i, t) in target.iter_mut().enumerate() {
                let value = chunk.get(i).map_or(0.0, |&s| exp((s - maximum) * scale));
                sums[i] += value;
                *t = round_to_bf16(value);
            }
        }
    }
    sums.iter().sum()
}

/// f32 attention: per head and block of query rows, `q k^T`, softmax and `p v` with the `gemm`
/// crate (single-threaded inside, the blocks run in parallel), written straight into the
/// `[b, l, heads * d]` output.
fn fused_f32(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let shapes = Shapes::of(q, k, v)?;
    let Shapes {
        keys,
        head_dim,
        queries,
        ..
    } = shapes;
    let pairs = shapes.batch * shapes.heads;
    let mut out = WriteOnce::<f32>::new(pairs * queries * head_dim);
    let target = out.target();
    with_qkv(q, k, v, |qs, ks, vs| {
        let (qs, ks, vs) = (f32_data(qs)?, f32_data(ks)?, f32_data(vs)?);
        let head = keys * head_dim;
        let scale = shapes.scale();
        let row_stride = shapes.heads * head_dim;
        (0..pairs * shapes.f32_query_blocks())
            .into_par_iter()
            .for_each(|task| {
                vectorised(
                    #[inline(always)]
                    || {
                        let (bh, block) = (
                            task / shapes.f32_query_blocks(),
                            task % shapes.f32_query_blocks(),
                        );
                        let first = block * F32_BLOCK_ROWS;
                        let rows = (queries - first).min(F32_BLOCK_ROWS);
                        let q_rows = &qs[(bh * queries + first) * head_dim..];
                        let (k_head, v_head) = (
                            &ks[bh * head..bh * head + head],
                            &vs[bh * head..bh * head + head],
                        );
                        with_f32_scratch(rows * keys, |scores| {
                            // SAFETY: all pointers and strides describe the slices above: q rows `[rows, d]`,
                            // K^T as `[d, keys]` (column stride d), scores `[rows, keys]`.
                            unsafe {
                                gemm::gemm(
                                    rows,
                                    keys,
                                    head_dim,
                                    scores.as_mut_ptr(),
                                    1,
                                    keys as isize,
                                    false,
                                    q_rows.as_ptr(),
                                    1,
                                    head_dim as isize,
                                    k_head.as_ptr(),
                                    head_dim as isize,
                                    1,
                                    0.0,
                                    1.0,
                                    false,
                                    false,
                                    false,
                                    gemm::Parallelism::None,
                                );
                            }
                            // Unnormalised weights; each output row is divided by its sum
                            // after the value product (`head_dim` values per row instead of
                            // `keys`).
                            let mut inverse_sums = [0f32; F32_BLOCK_ROWS];
                            for (row, inverse) in
                                scores.chunks_exact_mut(keys).zip(inverse_sums.iter_mut())
                            {
                                *inverse = 1.0 / shifted_exp(row, scale);
                            }
                            let probabilities = scores;
                            let destination = shapes.output_index(bh, first, 0);
                            // SAFETY: p `[rows, keys]`, V `[keys, d]`; the destination rows `first..first + rows`
                            // of this head (row stride heads * d) are written by this task only.
                            unsafe {
                                gemm::gemm(
                                    rows,
                                    head_dim,
                                    keys,
                                    target.pointer().add(destination),
                                    1,
                                    row_stride as isize,
                                    false,
                                    probabilities.as_ptr(),
                                    1,
                                    keys as isize,
                                    v_head.as_ptr(),
                                    1,
                                    head_dim as isize,
                                    0.0,
                                    1.0,
                                    false,
                                    false,
                                    false,
                                    gemm::Parallelism::None,
                                );
                            }
                            for (r, &inverse) in inverse_sums[..rows].iter().enumerate() {
                                // SAFETY: the `head_dim` values of row `first + r` of this head,
                                // just written by this task's product, belong to it alone.
                                let values = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        target.pointer().add(destination + r * row_stride),
                                        head_dim,
                                    )
                                };
                                for value in values {
                                    *value *= inverse;
                                }
                            }
                        });
                    },
                )
            });
        Ok(())
    })?;
    // SAFETY: the tasks cover every (sample, head, block of query rows), and each one's second
    // product (which does not read its destination) wrote the head_dim columns of its rows.
    let out = unsafe { out.assume_written() };
    Ok(Tensor::from_vec(
        out,
        (shapes.batch, queries, shapes.heads * head_dim),
        q.device(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Result<Tensor> {
        let mut rng = crate::util::rng::SeededRng::new(seed);
        let count = shape.0 * shape.1 * shape.2 * shape.3;
        let values: Vec<f32> = (0..count).map(|_| rng.normal() as f32).collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()?)
    }

    /// Odd sizes (a partial query block, keys not a multiple of 32, head dim 24) against the op path.
    #[test]
    fn fused_kernels_match_the_op_path() -> Result<()> {
        let q = random((2, 3, 45, 24), 1)?;
        let k = random((2, 3, 37, 24), 2)?;
        let v = random((2, 3, 37, 24), 3)?;
        let reference = attention_by_ops(&q, &k, &v)?;
        let fused = attention(&q, &k, &v)?;
        assert_eq!(fused.dims(), &[2, 45, 72]);
        assert!(max_difference(&fused, &reference)? < 1e-5);
        let (qb, kb, vb) = (
            q.to_dtype(DType::BF16)?,
            k.to_dtype(DType::BF16)?,
            v.to_dtype(DType::BF16)?,
        );
        let fused = attention(&qb, &kb, &vb)?;
        assert_eq!(fused.dtype(), DType::BF16);
        // bf16 output: within a few bf16 ulps of the f32 result (|values| < 3).
        assert!(max_difference(&fused, &reference)? < 3e-2);
        Ok(())
    }
}
