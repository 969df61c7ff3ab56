//! The tiled algorithm of the CUDA kernel against the composed attention (f64 candle ops: full
//! score matrix, differentiable softmax), forward and gradients, with tiles cut at the edges.

use candle_core::{DType, Device, Tensor, Var, D};

use super::tiled::{self, Products, TiledShape, FORWARD_BLOCK_K, FORWARD_BLOCK_Q};
use super::*;
use crate::util::rng::SeededRng;

fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
    let values = SeededRng::new(seed).normal_vec(shape.iter().product());
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

fn relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let difference = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(difference / norm.max(f64::MIN_POSITIVE))
}

/// `[b, h, l, d]` in, `[b, h, l, d]` out, in f64.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    let (q, k, v) = (
        q.to_dtype(DType::F64)?,
        k.to_dtype(DType::F64)?,
        v.to_dtype(DType::F64)?,
    );
    let scores = (q.matmul(&k.t()?)? * scale)?;
    Ok(candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?)
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// q, k, v of the given sizes; scaled by 2 so the softmax is far from uniform.
fn inputs(
    batch: usize,
    heads: usize,
    queries: usize,
    keys: usize,
    d: usize,
) -> Result<[Tensor; 3]> {
    Ok([
        (random(&[batch, heads, queries, d], 1)? * 2.0)?,
        (random(&[batch, heads, keys, d], 2)? * 2.0)?,
        random(&[batch, heads, keys, d], 3)?,
    ])
}

/// Sizes that cut the forward and backward tiles at the edges (not multiples of 64 or 32), with
/// the head dims of the tiny golden models (24, 32) and of FLUX.2 (128).
const CASES: [(usize, usize, usize, usize, usize); 3] = [
    (1, 2, 100, 90, 24),
    (2, 1, 70, 133, 32),
    (1, 1, 65, 40, 128),
];

// The cases cut the tiles: more queries than one forward tile, keys over two.
const _: () = assert!(100 > FORWARD_BLOCK_Q && 133 > 2 * FORWARD_BLOCK_K);

#[test]
fn tiled_forward_matches_composed() -> Result<()> {
    for (batch, heads, queries, keys, d) in CASES {
        let [q, k, v] = inputs(batch, heads, queries, keys, d)?;
        let shape = TiledShape {
            batch_heads: batch * heads,
            queries,
            keys,
            head_dim: d,
        };
        let reference = composed(&q, &k, &v)?;
        let (out, logsumexp) = tiled::forward(
            &values(&q)?,
            &values(&k)?,
            &values(&v)?,
            shape,
            Products::F32,
        );
        let out = Tensor::from_vec(out, q.dims(), &Device::Cpu)?;
        let error = relative_error(&out, &reference)?;
        println!("tiled forward f32 {:?}: rel_err={error:.3e}", q.dims());
        assert!(error < 1e-5, "rel_err {error}");
        // logsumexp of the scaled scores, from its definition.
        let scores = (q
            .to_dtype(DType::F64)?
            .matmul(&k.to_dtype(DType::F64)?.t()?)?
            * (1.0 / (d as f64).sqrt()))?;
        let expected = scores.exp()?.sum(D::Minus1)?.log()?.flatten_all()?;
        let logsumexp = Tensor::from_vec(logsumexp, batch * heads * queries, &Device::Cpu)?;
        assert!(relative_error(&logsumexp, &expected)? < 1e-6);

        // As the kernel: bf16 inputs, probabilities rounded to bf16 before the product with v.
        let rounded: Vec<Tensor> = [&q, &k, &v]
            .iter()
            .map(|t| t.to_dtype(DType::BF16)?.to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()?;
        let reference = composed(&rounded[0], &rounded[1], &rounded[2])?;
        let (out, _) = tiled::forward(
            &values(&rounded[0])?,
            &values(&rounded[1])?,
            &values(&rounded[2])?,
            shape,
            Products::Bf16,
        );
        let error = relative_error(&Tensor::from_vec(out, q.dims(), &Device::Cpu)?, &reference)?;
        println!(
            "tiled forward bf16 products {:?}: rel_err={error:.3e}",
            q.dims()
        );
        assert!(error < 5e-3, "rel_err {error}");
    }
    Ok(())
}

/// Gradients of `sum(attention * w)` for a fixed random `w`: the op (CPU = tiled algorithm)
/// against autograd through the composed f64 attention.
#[test]
fn op_gradients_match_composed() -> Result<()> {
    for (batch, heads, queries, keys, d) in CASES {
        let vars: Vec<Var> = inputs(batch, heads, queries, keys, d)?
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let weights = random(&[batch, queries, heads, d], 9)?;
        let ours = attention_rows(&vars[0], &vars[1], &vars[2])?;
        assert_eq!(ours.dims(), [batch, queries, heads, d]);
        let reference = composed(&vars[0], &vars[1], &vars[2])?.transpose(1, 2)?;
        let error = relative_error(&ours, &reference)?;
        assert!(error < 1e-5, "forward rel_err {error}");
        let ours = (ours * &weights)?.sum_all()?.backward()?;
        let theirs = (reference * weights.to_dtype(DType::F64)?)?
            .sum_all()?
            .backward()?;
        for (name, var) in ["dq", "dk", "dv"].iter().zip(&vars) {
            let (Some(a), Some(b)) = (ours.get(var), theirs.get(var)) else {
                panic!("missing gradient {name}");
            };
            let error = relative_error(a, b)?;
            println!("op {name} {:?}: rel_err={error:.3e}", var.dims());
            assert!(error < 1e-5, "{name} rel_err {error}");
        }
    }
    Ok(())
}

/// The backward with the kernel's bf16 products stays within bf16 accuracy of the exact
/// gradients.
#[test]
fn tiled_backward_with_bf16_products_is_close() -> Result<()> {
    let (batch, heads, queries, keys, d) = (1, 2, 100, 90, 32);
    let vars: Vec<Var> = inputs(batch, heads, queries, keys, d)?
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?))
        .collect::<candle_core::Result<_>>()?;
    let grad_out = random(&[batch, heads, queries, d], 9)?;
    let reference = composed(&vars[0], &vars[1], &vars[2])?;
    let exact = (&reference * grad_out.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let shape = TiledShape {
        batch_heads: batch * heads,
        queries,
        keys,
        head_dim: d,
    };
    let (q, k, v) = (values(&vars[0])?, values(&vars[1])?, values(&vars[2])?);
    let (out, logsumexp) = tiled::forward(&q, &k, &v, shape, Products::Bf16);
    let grad_values = values(&grad_out)?;
    let delta = tiled::delta(&out, &grad_values, d);
    let grads = tiled::backward(
        &q,
        &k,
        &v,
        &grad_values,
        &logsumexp,
        &delta,
        shape,
        Products::Bf16,
    );
    for (name, (grad, var)) in ["dq", "dk", "dv"]
        .iter()
        .zip([grads.0, grads.1, grads.2].into_iter().zip(&vars))
    {
        let Some(expected) = exact.get(var) else {
            panic!("missing gradient {name}");
        };
        let grad = Tensor::from_vec(grad, var.dims(), &Device::Cpu)?;
        let error = relative_error(&grad, expected)?;
        println!("tiled {name} bf16 products: rel_err={error:.3e}");
        assert!(error < 1e-2, "{name} rel_err {error}");
    }
    Ok(())
}

#[test]
fn fused_kernel_never_applies_on_the_cpu() -> Result<()> {
    let q = random(&[1, 1, 4, 8], 1)?.to_dtype(DType::BF16)?;
    let before = selected();
    select(AttentionKernel::Fused);
    let applies = applies_to(&q);
    select(before);
    assert!(!applies);
    Ok(())
}

#[test]
fn mismatched_shapes_are_refused() -> Result<()> {
    let q = random(&[1, 2, 4, 8], 1)?;
    let k = random(&[1, 2, 5, 8], 2)?;
    let v = random(&[1, 2, 6, 8], 3)?;
    let error = attention(&q, &k, &v).map(|_| ()).unwrap_err().to_string();
    assert!(error.contains("v has shape [1, 2, 6, 8]"), "{error}");
    Ok(())
}
