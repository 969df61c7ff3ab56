//! Scaled dot-product attention without a mask (FLUX.2 joint attention, `nn::attention`) with its
//! own backward, flash-attention style: the forward runs over chunks of query rows and keeps only
//! the output and the per-row logsumexp; the backward recomputes each chunk's probabilities from
//! them. No `[l, l]` score matrix is ever stored, and at most one chunk's scores exist at a time.

use std::sync::Mutex;

use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Tensor, D};

use super::softmax_rows::{probabilities, score_gradient, softmax_with_logsumexp};
use super::storage::{compute_dtype, storage_from, tensor_from, DeviceStorage};
use crate::error::Result;

/// Largest number of score elements (`batch * heads * query_rows * keys`) held at once.
const MAX_SCORE_ELEMENTS: usize = 1 << 22;

/// `softmax(q k^T / sqrt(d)) v`, accumulated in f32 (f64 for f64 inputs), in `q`'s dtype.
///
/// # Shapes
/// `q`: `[b, heads, l, d]`; `k`, `v`: `[b, heads, keys, d]`; returns `[b, l, heads * d]`
/// (as `nn::attention::attention`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (batch, heads, length, head_dim) = q.dims4()?;
    let out = attention_heads(q, k, v)?;
    Ok(out
        .transpose(1, 2)?
        .reshape((batch, length, heads * head_dim))?)
}

/// As [`attention`], returning `[b, heads, l, d]`.
pub fn attention_heads(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    heads_with(q, k, v, false)
}

/// Checks the inputs and applies the op, `[b, heads, l, d]` out.
fn heads_with(q: &Tensor, k: &Tensor, v: &Tensor, bf16_products: bool) -> Result<Tensor> {
    crate::nn::attention::check_qkv("attention", q, k, v)?;
    let op = AttentionOp {
        logsumexp: Mutex::new(None),
        bf16_products,
    };
    Ok(q.apply_op3(k, v, op)?)
}

/// As [`attention`] for f32 `q`, `k`, `v` of a bf16 model trained on the CPU (bf16 mixed
/// precision, `Flux2Dit::activation_dtype`): the four products of the forward and backward
/// round their operands to bf16 and run on AMX tiles, as PyTorch's bf16 attention does; the
/// softmax and every accumulation stay f32.
pub fn attention_with_bf16_products(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (batch, heads, length, head_dim) = q.dims4()?;
    Ok(heads_with(q, k, v, true)?
        .transpose(1, 2)?
        .reshape((batch, length, heads * head_dim))?)
}

struct AttentionOp {
    /// `[b, heads, l, 1]` in the compute dtype, written by the forward, read by the backward.
    logsumexp: Mutex<Option<Tensor>>,
    /// Products of bf16-rounded operands (f32 CPU inputs only; see `bf16_products`).
    bf16_products: bool,
}

impl AttentionOp {
    fn product(&self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        if self.bf16_products {
            super::bf16_products::matmul(a, b)
        } else {
            a.matmul(b)
        }
    }
}

/// Query rows per chunk so that one chunk's scores stay under [`MAX_SCORE_ELEMENTS`].
fn rows_per_chunk(q: &Tensor, keys: usize) -> candle_core::Result<usize> {
    let (batch, heads, length, _) = q.dims4()?;
    Ok((MAX_SCORE_ELEMENTS / (batch * heads * keys).max(1)).clamp(1, length.max(1)))
}

/// Start and length of each chunk of query rows.
fn chunks(length: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..length)
        .step_by(rows.max(1))
        .map(move |start| (start, rows.min(length - start)))
}

/// Output `[b, h, l, d]` and logsumexp `[b, h, l, 1]` of contiguous compute-dtype `q`, `k`, `v`.
fn forward(
    op: &AttentionOp,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (_, _, length, head_dim) = q.dims4()?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let k_t = k.t()?;
    let rows = rows_per_chunk(q, k.dim(2)?)?;
    let mut outputs = Vec::new();
    let mut logsumexps = Vec::new();
    for (start, len) in chunks(length, rows) {
        // Scaling the `[rows, d]` queries is cheaper than scaling the `[rows, keys]` scores.
        let scores = op.product(&(q.narrow(2, start, len)? * scale)?, &k_t)?;
        let (probabilities, logsumexp) = softmax_with_logsumexp(&scores)?;
        outputs.push(op.product(&probabilities, v)?);
        logsumexps.push(logsumexp);
    }
    Ok((Tensor::cat(&outputs, 2)?, Tensor::cat(&logsumexps, 2)?))
}

impl AttentionOp {
    fn forward_on<S: DeviceStorage>(
        &self,
        q: (&S, &Layout),
        k: (&S, &Layout),
        v: (&S, &Layout),
    ) -> candle_core::Result<(S, Shape)> {
        let dtype = q.0.dtype();
        let compute = compute_dtype(dtype);
        let q = tensor_from(q.0, q.1, compute)?;
        let k = tensor_from(k.0, k.1, compute)?;
        let v = tensor_from(v.0, v.1, compute)?;
        let (out, logsumexp) = forward(self, &q, &k, &v)?;
        *self
            .logsumexp
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned logsumexp lock".into()))? =
            Some(logsumexp);
        storage_from(&out, dtype)
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "trainable-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward_on((s1, l1), (s2, l2), (s3, l3))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.forward_on((s1, l1), (s2, l2), (s3, l3))
    }

    /// Per chunk of query rows, with `P = exp(q k^T s - lse)` recomputed and
    /// `delta = rowsum(dO * O)`: `dV += P^T dO`, `dS = P (dO V^T - delta)`,
    /// `dQ = dS K s`, `dK += dS^T Q s` (`s = 1 / sqrt(d)`).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let logsumexp = self
            .logsumexp
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned logsumexp lock".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("attention: backward before forward".into()))?;
        let compute = logsumexp.dtype();
        let cast = |t: &Tensor| t.detach().to_dtype(compute)?.contiguous();
        let (q32, k32, v32, grad) = (cast(q)?, cast(k)?, cast(v)?, cast(grad)?);
        let (_, _, length, head_dim) = q32.dims4()?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let delta = (&grad * cast(out)?)?.sum_keepdim(D::Minus1)?;
        let (k_t, v_t) = (k32.t()?, v32.t()?);
        let mut q_grads = Vec::new();
        let mut k_grad = k32.zeros_like()?;
        let mut v_grad = v32.zeros_like()?;
        for (start, len) in chunks(length, rows_per_chunk(&q32, k32.dim(2)?)?) {
            let q_chunk = q32.narrow(2, start, len)?;
            let grad_chunk = grad.narrow(2, start, len)?;
            let scores = self.product(&(&q_chunk * scale)?, &k_t)?;
            let probabilities =
                probabilities(&scores, &logsumexp.narrow(2, start, len)?.contiguous()?)?;
            v_grad = (v_grad + self.product(&probabilities.t()?, &grad_chunk)?)?;
            let probability_grad = self.product(&grad_chunk, &v_t)?;
            // `dS` without the factor `s`, applied to the smaller `[rows, d]` products instead.
            let delta_chunk = delta.narrow(2, start, len)?.contiguous()?;
            let score_grad = score_gradient(&probabilities, &probability_grad, &delta_chunk)?;
            q_grads.push((self.product(&score_grad, &k32)? * scale)?);
            k_grad = (k_grad + (self.product(&score_grad.t()?, &q_chunk)? * scale)?)?;
        }
        let q_grad = Tensor::cat(&q_grads, 2)?.to_dtype(q.dtype())?;
        Ok((
            Some(q_grad),
            Some(k_grad.to_dtype(k.dtype())?),
            Some(v_grad.to_dtype(v.dtype())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::trainable::test_support::{check_gradients, random, relative_difference};
    use candle_core::{DType, Var};

    /// Composed candle attention: full score matrix, differentiable softmax, in f32.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        let q32 = q.to_dtype(DType::F32)?;
        let scores = (q32.matmul(&k.to_dtype(DType::F32)?.t()?)? * scale)?;
        let probabilities = candle_nn::ops::softmax(&scores, D::Minus1)?;
        Ok(probabilities
            .matmul(&v.to_dtype(DType::F32)?)?
            .to_dtype(q.dtype())?)
    }

    #[test]
    fn forward_matches_composed_and_existing_attention() -> Result<()> {
        let q = random(&[2, 3, 9, 8], 1, DType::F32)?;
        let k = random(&[2, 3, 9, 8], 2, DType::F32)?;
        let v = random(&[2, 3, 9, 8], 3, DType::F32)?;
        let ours = attention_heads(&q, &k, &v)?;
        assert!(relative_difference(&ours, &composed(&q, &k, &v)?)? < 1e-6);
        let existing = crate::nn::attention::attention(&q, &k, &v)?;
        assert!(relative_difference(&attention(&q, &k, &v)?, &existing)? < 1e-6);
        let (q16, k16, v16) = (
            q.to_dtype(DType::BF16)?,
            k.to_dtype(DType::BF16)?,
            v.to_dtype(DType::BF16)?,
        );
        let ours16 = attention_heads(&q16, &k16, &v16)?;
        assert_eq!(ours16.dtype(), DType::BF16);
        assert!(relative_difference(&ours16, &composed(&q16, &k16, &v16)?)? < 1e-2);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        // Scaled up so the softmax is far from uniform and the test has teeth.
        let q = (random(&[1, 2, 5, 4], 4, DType::F64)? * 2.0)?;
        let k = (random(&[1, 2, 6, 4], 5, DType::F64)? * 2.0)?;
        let v = random(&[1, 2, 6, 4], 6, DType::F64)?;
        let error = check_gradients(&[q, k, v], |t| attention_heads(&t[0], &t[1], &t[2]))?;
        assert!(error < 1e-7, "relative error {error}");
        Ok(())
    }

    /// Several chunks (a long sequence) give the composed gradients.
    #[test]
    fn chunked_gradients_match_composed() -> Result<()> {
        let shape = [1, 2, 2100, 8];
        let rows = (MAX_SCORE_ELEMENTS / (2 * 2100)).min(2100);
        assert!(
            rows < 2100 / 2,
            "the test must span several chunks, got {rows} rows per chunk"
        );
        let vars: Vec<Var> = (0..3)
            .map(|seed| Ok(Var::from_tensor(&random(&shape, 10 + seed, DType::F32)?)?))
            .collect::<Result<_>>()?;
        let weights = random(&shape, 20, DType::F32)?;
        let ours = (attention_heads(&vars[0], &vars[1], &vars[2])? * &weights)?
            .sum_all()?
            .backward()?;
        let theirs = (composed(&vars[0], &vars[1], &vars[2])? * &weights)?
            .sum_all()?
            .backward()?;
        for var in &vars {
            let (a, b) = (ours.get(var), theirs.get(var));
            let (Some(a), Some(b)) = (a, b) else {
                panic!("missing gradient");
            };
            assert!(relative_difference(a, b)? < 1e-5);
        }
        Ok(())
    }
}
