//! Bad input to the checkpoint loader: each case must be a clear error naming the file and, where
//! there is one, the key, what was found and what was expected. Never a panic.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::{save_safetensors, Checkpoint};
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::{DitConfig, Flux2Dit};
use flux2_tuner::models::ModelVersion;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flux2-tuner-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny_config(guidance_embed: bool) -> DitConfig {
    DitConfig {
        in_channels: 128,
        context_in_dim: 24,
        hidden_size: 32,
        num_heads: 2,
        depth: 1,
        depth_single_blocks: 1,
        mlp_hidden_size: 96,
        axes_dim: [4, 4, 4, 4],
        theta: 2000.0,
        guidance_embed,
    }
}

fn open_error(path: &Path) -> String {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened without error", path.display()),
        Err(e) => e.to_string(),
    }
}

fn load_error(path: &Path, version: Option<ModelVersion>) -> String {
    let checkpoint = Checkpoint::open(path).unwrap();
    match Flux2Dit::load(&checkpoint, version, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded without error", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites a tiny DiT with `edit` applied to its tensor list.
fn edited_dit(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let source = dir.join("source.safetensors");
    write_random_dit(&tiny_config(false), &source, 1, DType::BF16).unwrap();
    let checkpoint = Checkpoint::open(&source).unwrap();
    let mut tensors: Vec<(String, Tensor)> = checkpoint
        .keys()
        .map(|k| {
            (
                k.to_string(),
                checkpoint.load(k, DType::BF16, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    edit(&mut tensors);
    let path = dir.join(name);
    save_safetensors(&path, &tensors, None).unwrap();
    path
}

#[test]
fn missing_file_names_the_path() {
    let message = open_error(Path::new("/nonexistent/flux2-dev.safetensors"));
    assert!(
        message.contains("/nonexistent/flux2-dev.safetensors") && message.contains("not found"),
        "{message}"
    );
}

#[test]
fn truncated_file_is_reported() {
    let dir = temp_dir("truncated");
    let good = dir.join("good.safetensors");
    write_random_dit(&tiny_config(false), &good, 1, DType::BF16).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let message = open_error(&cut);
    assert!(
        message.contains("cut.safetensors") && message.contains("truncated"),
        "{message}"
    );
    let tiny = dir.join("tiny.safetensors");
    std::fs::write(&tiny, [1u8, 2, 3]).unwrap();
    let message = open_error(&tiny);
    assert!(message.contains("3 bytes"), "{message}");
}

#[test]
fn header_that_is_not_json_is_reported() {
    let dir = temp_dir("notjson");
    let path = dir.join("bad.safetensors");
    let header = b"this is not json";
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&(header.len() as u64).to_le_bytes())
        .unwrap();
    file.write_all(header).unwrap();
    drop(file);
    let message = open_error(&path);
    assert!(
        message.contains("bad.safetensors") && message.contains("not valid JSON"),
        "{message}"
    );
}

#[test]
fn absurd_header_length_is_reported() {
    let dir = temp_dir("absurd");
    let path = dir.join("absurd.safetensors");
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    let message = open_error(&path);
    assert!(
        message.contains("header length") && message.contains("absurd.safetensors"),
        "{message}"
    );
    // A length that fits the limit but not the file.
    let mut bytes = 5000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    let message = open_error(&path);
    assert!(
        message.contains("5000") && message.contains("truncated"),
        "{message}"
    );
}

#[test]
fn wrong_version_says_what_the_file_looks_like() {
    let dir = temp_dir("version");
    let path = dir.join("klein-like.safetensors");
    write_random_dit(&tiny_config(false), &path, 1, DType::BF16).unwrap();
    let message = load_error(&path, Some(ModelVersion::Dev));
    assert!(
        message.contains("not dev") && message.contains("guidance"),
        "{message}"
    );
    // Real-size version mix-ups are checked on headers in tests/real_size.rs.
}

#[test]
fn missing_key_names_the_key_and_shape() {
    let dir = temp_dir("missing");
    let path = edited_dit(&dir, "missing.safetensors", |t| {
        t.retain(|(k, _)| k != "double_blocks.0.txt_mlp.2.weight")
    });
    let message = load_error(&path, None);
    assert!(
        message.contains("double_blocks.0.txt_mlp.2.weight") && message.contains("[32, 96]"),
        "{message}"
    );
}

#[test]
fn wrong_shape_names_key_expected_and_found() {
    let dir = temp_dir("shape");
    let path = edited_dit(&dir, "shape.safetensors", |t| {
        for (k, v) in t.iter_mut() {
            if k == "single_blocks.0.linear2.weight" {
                *v = Tensor::zeros((32, 95), DType::BF16, &Device::Cpu).unwrap();
            }
        }
    });
    let message = load_error(&path, None);
    assert!(
        message.contains("single_blocks.0.linear2.weight")
            && message.contains("[32, 95]")
            && message.contains("[32, 128]"),
        "{message}"
    );
}

#[test]
fn wrong_dtype_names_the_key() {
    let dir = temp_dir("dtype");
    let path = edited_dit(&dir, "dtype.safetensors", |t| {
        for (k, v) in t.iter_mut() {
            if k == "img_in.weight" {
                *v = v.to_dtype(DType::I64).unwrap();
            }
        }
    });
    let message = load_error(&path, None);
    assert!(
        message.contains("img_in.weight") && message.contains("I64"),
        "{message}"
    );
}

#[test]
fn unknown_extra_key_is_an_error() {
    let dir = temp_dir("extra");
    let path = edited_dit(&dir, "extra.safetensors", |t| {
        t.push((
            "vector_in.in_layer.weight".into(),
            Tensor::zeros((2, 2), DType::BF16, &Device::Cpu).unwrap(),
        ))
    });
    let message = load_error(&path, None);
    assert!(
        message.contains("vector_in.in_layer.weight") && message.contains("unexpected"),
        "{message}"
    );
}

/// The same weights stored as f32, f16, bf16 and F8E4M3 load, and the stored values survive.
#[test]
fn every_weight_dtype_loads() {
    let dir = temp_dir("dtypes");
    let reference = dir.join("bf16.safetensors");
    write_random_dit(&tiny_config(true), &reference, 3, DType::BF16).unwrap();
    let base = Checkpoint::open(&reference).unwrap();
    let original = base
        .load("img_in.weight", DType::F32, &Device::Cpu)
        .unwrap();
    for (dtype, tolerance) in [(DType::F32, 0.0), (DType::F16, 1e-2), (DType::F8E4M3, 0.07)] {
        let tensors: Vec<(String, Tensor)> = base
            .keys()
            .map(|k| (k.to_string(), base.load(k, dtype, &Device::Cpu).unwrap()))
            .collect();
        let path = dir.join(format!("{dtype:?}.safetensors"));
        save_safetensors(&path, &tensors, None).unwrap();
        let checkpoint = Checkpoint::open(&path).unwrap();
        let dit = Flux2Dit::load(
            &checkpoint,
            Some(ModelVersion::Dev),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let loaded = &dit.img_in.weight;
        let error = (loaded - &original)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = original
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            error <= tolerance * scale,
            "{dtype:?}: error {error} of {scale}"
        );
    }
}

/// A checkpoint split into Musubi-named shards loads from its first shard, with or without an
/// index file, and gives the same model; a missing shard is named.
#[test]
fn split_shards_load_from_the_first_shard_or_an_index() {
    let dir = temp_dir("shards");
    let single = dir.join("single.safetensors");
    write_random_dit(&tiny_config(false), &single, 5, DType::BF16).unwrap();
    let checkpoint = Checkpoint::open(&single).unwrap();
    let keys: Vec<String> = checkpoint.keys().map(str::to_string).collect();
    let (first, second) = keys.split_at(keys.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (index, part) in [first, second].iter().enumerate() {
        let name = format!(
            "diffusion_pytorch_model-{:05}-of-00002.safetensors",
            index + 1
        );
        let tensors: Vec<(String, Tensor)> = part
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    checkpoint.load(k, DType::BF16, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        save_safetensors(&dir.join(&name), &tensors, None).unwrap();
        for k in part.iter() {
            weight_map.insert(k.clone(), serde_json::Value::String(name.clone()));
        }
    }
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    std::fs::write(
        &index,
        serde_json::json!({ "weight_map": weight_map }).to_string(),
    )
    .unwrap();

    let whole = Flux2Dit::load(&checkpoint, None, DType::F32, &Device::Cpu).unwrap();
    for path in [
        dir.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
        index,
    ] {
        let split = Checkpoint::open(&path).unwrap();
        assert_eq!(split.len(), checkpoint.len());
        let dit = Flux2Dit::load(&split, None, DType::F32, &Device::Cpu).unwrap();
        let a = &dit.single_blocks[0].linear2.weight;
        let b = &whole.single_blocks[0].linear2.weight;
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    std::fs::remove_file(dir.join("diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    let message = open_error(&dir.join("diffusion_pytorch_model-00001-of-00002.safetensors"));
    assert!(
        message.contains("00002-of-00002") && message.contains("missing"),
        "{message}"
    );
}
