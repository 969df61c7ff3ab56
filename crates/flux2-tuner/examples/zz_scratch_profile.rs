use candle_core::{Device, Tensor, Var};
use std::time::Instant;
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let d = Device::Cpu;
    let mk = || Var::from_tensor(&Tensor::randn(0f32, 1., (1, 8, 1024, 64), &d).unwrap()).unwrap();
    let (q, k, v) = (mk(), mk(), mk());
    let w = Tensor::randn(0f32, 1., (1, 8, 1024, 64), &d)?;
    for _ in 0..4 {
        let s = Instant::now();
        let out = flux2_tuner::nn::trainable::attention_heads(&q, &k, &v)?;
        let loss = (out * &w)?.sum_all()?;
        let f = s.elapsed().as_secs_f64() * 1e3;
        let s = Instant::now();
        let _g = loss.backward()?;
        println!(
            "fwd {f:.1} ms, bwd {:.1} ms",
            s.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
