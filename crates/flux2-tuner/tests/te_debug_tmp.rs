use candle_core::{DType, Device};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::text::{TextEncoder, TextEncoderOptions};
use flux2_tuner::models::TextEncoderKind;

#[test]
fn debug() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden");
    for (v, kind) in [("dev", TextEncoderKind::Mistral3), ("klein", TextEncoderKind::Qwen3)] {
        let golden = Checkpoint::open(&root.join(format!("{v}/cases/te_encode.safetensors"))).unwrap();
        let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
        let prompts: Vec<String> = manifest["variants"][v]["cases"]["te_encode"]["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
        let p: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
        let enc = TextEncoder::load(&root.join(format!("{v}/text_encoder/model.safetensors")), kind, &TextEncoderOptions::new(kind, Device::Cpu, DType::BF16)).unwrap();
        let out = enc.encode(&p).unwrap().to_dtype(DType::F32).unwrap();
        let h = enc.hidden_size();
        for i in 0..p.len() {
            let g = golden.load(&format!("p{i}.prompt_embeds"), DType::F32, &Device::Cpu).unwrap();
            let o = out.narrow(0, i, 1).unwrap();
            let mask: Vec<i64> = golden.load(&format!("p{i}.attention_mask"), DType::I64, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let scale = g.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            for j in 0..3 {
                let d = (o.narrow(2, j*h, h).unwrap() - g.narrow(2, j*h, h).unwrap()).unwrap().abs().unwrap();
                let per_tok: Vec<f32> = d.max(2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let (mut wr, mut wp) = (0f32, 0f32);
                for (t, e) in per_tok.iter().enumerate() { if mask[t]==1 { wr = wr.max(*e) } else { wp = wp.max(*e) } }
                let gs = g.narrow(2, j*h, h).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                println!("{v} p{i} layer{j}: real {:.3e} pad {:.3e} (scale {scale:.3} layer scale {gs:.3})", wr/scale, wp/scale);
            }
        }
    }
}
