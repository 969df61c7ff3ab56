//! End to end on the tiny golden models: make a small dataset, cache latents and text-encoder
//! outputs, train a LoRA, and check that the loss falls, that the logs read back, that a resumed
//! run reproduces the uninterrupted one, and that the saved LoRA, loaded the way `generate` loads
//! it, gives the trained model's output.

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::lora::{KeyFilter, LoraFile};
use flux2_tuner::models::dit::tokens::{image_position_ids, text_position_ids};
use flux2_tuner::models::dit::{DitInput, Flux2Dit};
use flux2_tuner::train::network::{LoraNetwork, NetworkConfig};
use flux2_tuner::util::rng::SeededRng;

mod common;
use common::{cache, golden, losses, make_dataset, run, strings, train_args, TWO_SQUARES};

#[test]
fn cache_train_resume_and_generate_agree() {
    let dir = std::env::temp_dir().join(format!("flux2-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = make_dataset(&dir, &TWO_SQUARES);
    let g = golden();
    cache(&config);

    // 1. An uninterrupted run of 12 steps (saving every 3 steps): the loss falls.
    let full = dir.join("full");
    let mut full_args = train_args(&config, &full, 12);
    full_args.extend(strings(&[
        "--save_every_n_steps",
        "3",
        "--save_state",
        "--save_last_n_steps",
        "5",
    ]));
    run(&full_args);
    // Saves at steps 3, 6 and 9; keeping the last 5 steps' files removed step 3 at step 9, and
    // state folders (no `--save_last_n_steps_state`) are all kept.
    assert!(!full.join("e2e-step00000003.safetensors").exists());
    assert!(
        full.join("e2e-step00000006.safetensors").exists()
            && full.join("e2e-step00000009.safetensors").exists()
    );
    assert!(full.join("e2e-step00000003-state").is_dir());
    let full_losses = losses(&full.join("logs"));
    assert_eq!(full_losses.len(), 12);
    let first: f32 = full_losses[..4].iter().sum::<f32>() / 4.0;
    let last: f32 = full_losses[8..].iter().sum::<f32>() / 4.0;
    assert!(last < 0.9 * first, "loss did not fall: {full_losses:?}");
    let jsonl = std::fs::read_to_string(full.join("logs/e2e.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 12);

    // 2. Resumed from the state saved at step 6: the same losses as the uninterrupted run.
    let mut resumed = train_args(&config, &dir.join("resumed"), 12);
    resumed.push("--resume".into());
    resumed.push(full.join("e2e-step00000006-state").display().to_string());
    run(&resumed);
    let resumed_losses = losses(&dir.join("resumed/logs"));
    assert_eq!(resumed_losses.len(), 6, "the resumed run starts at step 7");
    for (a, b) in full_losses[6..].iter().zip(&resumed_losses) {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs(),
            "resumed {resumed_losses:?} vs {full_losses:?}"
        );
    }

    // 2b. LoRA dropouts from the command line: the run trains, its losses differ from the run
    // without dropout, and the file records the dropout.
    let dropped = dir.join("dropout");
    let mut dropout_args = train_args(&config, &dropped, 3);
    dropout_args.extend(strings(&[
        "--network_dropout",
        "0.3",
        "--network_args",
        "rank_dropout=0.2",
        "module_dropout=0.1",
    ]));
    run(&dropout_args);
    let dropout_losses = losses(&dropped.join("logs"));
    assert_eq!(dropout_losses.len(), 3);
    assert!(dropout_losses.iter().all(|l| l.is_finite()));
    assert!(
        dropout_losses
            .iter()
            .zip(&full_losses)
            .skip(1)
            .any(|(a, b)| a != b),
        "dropout changed nothing: {dropout_losses:?} vs {full_losses:?}"
    );
    let dropout_metadata = Checkpoint::open(&dropped.join("e2e.safetensors"))
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(dropout_metadata["ss_network_dropout"], "0.3");

    // 2c. --base_weights merges a LoRA before training: the first loss equals that of a run
    // continuing from the same LoRA unmerged (--network_weights), same seed and batch.
    let step6 = full
        .join("e2e-step00000006.safetensors")
        .display()
        .to_string();
    let based = dir.join("base-weights");
    let mut based_args = train_args(&config, &based, 1);
    based_args.extend(strings(&[
        "--base_weights",
        &step6,
        "--base_weights_multiplier",
        "1.0",
    ]));
    run(&based_args);
    let continued = dir.join("continued");
    let mut continued_args = train_args(&config, &continued, 1);
    continued_args.extend(strings(&["--network_weights", &step6]));
    run(&continued_args);
    let (based_loss, continued_loss) = (
        losses(&based.join("logs"))[0],
        losses(&continued.join("logs"))[0],
    );
    assert!(
        (based_loss - continued_loss).abs() <= 1e-4 * continued_loss.abs(),
        "merged base {based_loss} vs unmerged {continued_loss}"
    );
    assert!((based_loss - full_losses[0]).abs() > 1e-3 * full_losses[0].abs());

    // 2d. --scale_weight_norms caps every module's update norm (scale * up @ down) in the saved
    // LoRA, and logs the max-norm values.
    let capped = dir.join("capped");
    let limit = 0.02f32;
    let mut capped_args = train_args(&config, &capped, 3);
    capped_args.extend(strings(&["--scale_weight_norms", &limit.to_string()]));
    run(&capped_args);
    let capped_file = Checkpoint::open(&capped.join("e2e.safetensors")).unwrap();
    let mut largest = 0f32;
    for key in capped_file
        .keys()
        .filter(|k| k.ends_with(".lora_down.weight"))
    {
        let name = key.trim_end_matches(".lora_down.weight");
        let load = |k: String| capped_file.load(&k, DType::F32, &Device::Cpu).unwrap();
        let down = load(format!("{name}.lora_down.weight"));
        let up = load(format!("{name}.lora_up.weight"));
        let alpha = load(format!("{name}.alpha")).to_vec0::<f32>().unwrap();
        let scale = alpha / down.dim(0).unwrap() as f32;
        let norm = (up.matmul(&down).unwrap() * scale as f64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        largest = largest.max(norm);
    }
    assert!(
        largest <= limit * 1.0001,
        "largest update norm {largest} over {limit}"
    );
    assert!(
        largest >= limit * 0.9999,
        "no module reached the cap: {largest}"
    );
    let capped_log = std::fs::read_to_string(capped.join("logs/e2e.jsonl")).unwrap();
    assert!(capped_log.contains("max_norm/keys_scaled"), "{capped_log}");

    // 3. Ctrl-C (SIGINT) saves the LoRA and a resumable state, and exits cleanly.
    let interrupted = dir.join("interrupted");
    let mut long_run = train_args(&config, &interrupted, 100_000);
    long_run.retain(|a| a != "--logging_dir" && !a.ends_with("/logs"));
    long_run.extend(strings(&["--logging_dir"]));
    long_run.push(interrupted.join("logs").display().to_string());
    let child = Command::new(env!("CARGO_BIN_EXE_flux2-tuner"))
        .args(&long_run)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = interrupted.join("logs/e2e.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(started.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    let message = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{message}");
    assert!(message.contains("interrupted after"), "{message}");
    let saved: Vec<String> = std::fs::read_dir(&interrupted)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        saved
            .iter()
            .any(|n| n.starts_with("e2e-interrupted-step") && n.ends_with(".safetensors")),
        "{saved:?}"
    );
    assert!(
        saved
            .iter()
            .any(|n| n.starts_with("e2e-interrupted-step") && n.ends_with("-state")),
        "{saved:?}"
    );

    // 4. The saved LoRA through generate's loader (merged) equals the trained network's output.
    let lora_path = full.join("e2e.safetensors");
    let metadata = Checkpoint::open(&lora_path).unwrap().metadata().clone();
    assert_eq!(metadata["ss_network_module"], "networks.lora_flux_2");
    assert_eq!(metadata["ss_steps"], "12");
    let device = Device::Cpu;
    let dit_path = g.join("klein/dit.safetensors");
    let load = || {
        Flux2Dit::load(
            &Checkpoint::open(&dit_path).unwrap(),
            None,
            DType::F32,
            &device,
        )
        .unwrap()
    };
    let mut trained = load();
    let mut network = LoraNetwork::new(
        &trained.config,
        NetworkConfig {
            dim: 4,
            alpha: 4.0,
            ..NetworkConfig::default()
        },
        &mut SeededRng::new(0),
        &device,
    )
    .unwrap();
    network.load_weights(&lora_path).unwrap();
    network.attach(&mut trained, 1.0).unwrap();
    let mut merged = load();
    let shapes = flux2_tuner::lora::linear_shapes(&merged.linears_mut());
    LoraFile::load(&lora_path, &shapes, &KeyFilter::default(), &device)
        .unwrap()
        .apply(merged.linears_mut(), 1.0, true)
        .unwrap();
    let tokens = Tensor::randn(0f32, 1.0, (1, 16, 128), &device).unwrap();
    let text = Tensor::randn(0f32, 1.0, (1, 7, trained.config.context_in_dim), &device).unwrap();
    let ids = image_position_ids(1, 4, 4, 0, &device).unwrap();
    let text_ids = text_position_ids(1, 7, &device).unwrap();
    let t = Tensor::new(&[0.4f32], &device).unwrap();
    let input = DitInput {
        image_tokens: &tokens,
        image_position_ids: &ids,
        text_embeddings: &text,
        text_position_ids: &text_ids,
        timesteps: &t,
        guidance: None,
    };
    let a = trained.forward(&input).unwrap();
    let b = merged.forward(&input).unwrap();
    let base = load().forward(&input).unwrap();
    let effect = (&a - &base)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let error = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(effect > 1e-3, "the trained LoRA changes nothing");
    assert!(
        error < 1e-4 * effect.max(1.0),
        "merged {error} vs effect {effect}"
    );

    // 5. generate with the trained LoRA writes an image.
    let images = dir.join("images-out");
    let mut generate = strings(&["generate", "--model_version", "klein-base-4b", "--dit"]);
    generate.push(dit_path.display().to_string());
    generate.extend(strings(&["--vae"]));
    generate.push(g.join("ae.safetensors").display().to_string());
    generate.extend(strings(&["--text_encoder"]));
    generate.push(
        g.join("klein/text_encoder/model.safetensors")
            .display()
            .to_string(),
    );
    generate.extend(strings(&[
        "--prompt",
        "a square",
        "--image_size",
        "64",
        "64",
        "--infer_steps",
        "2",
        "--lora_weight",
    ]));
    generate.push(lora_path.display().to_string());
    generate.push("--save_path".into());
    generate.push(images.display().to_string());
    run(&generate);
    assert_eq!(std::fs::read_dir(&images).unwrap().count(), 1);
}
