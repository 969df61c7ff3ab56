//! `train --caption_dropout_rate` end to end on the tiny golden models: the cache job writes the
//! empty-prompt embedding (the text encoder's output for ""), dropping every caption trains
//! exactly as a dataset whose captions are all empty, rate 0 changes nothing, a resumed run drops
//! the same items, and a missing embedding is an error naming the command that writes it.

use candle_core::{DType, Device};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::data::empty_prompt::empty_prompt_cache_path;
use flux2_tuner::models::text::encoder::{TextEncoder, TextEncoderOptions};
use flux2_tuner::models::ModelVersion;

mod common;
use common::{cache, command, golden, losses, make_dataset, run, strings, train_args, TWO_SQUARES};

fn values(tensor: &candle_core::Tensor) -> Vec<f32> {
    tensor
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn caption_dropout_trains_on_the_cached_empty_prompt() {
    let dir = std::env::temp_dir().join(format!("flux2-e2e-dropout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = make_dataset(&dir, &TWO_SQUARES);
    cache(&config);

    // 1. The empty-prompt file holds the text encoder's output for "" (bf16, as every text cache).
    let empty_file = empty_prompt_cache_path(&dir.join("cache"), "f2k4b");
    assert_eq!(
        empty_file.file_name().unwrap().to_string_lossy(),
        "empty_prompt.f2k4b_te.safetensors"
    );
    let cached = Checkpoint::open(&empty_file).unwrap();
    assert_eq!(cached.metadata()["caption1"], "");
    let cached = cached
        .load("ctx_vec_bfloat16", DType::BF16, &Device::Cpu)
        .unwrap();
    let info: ModelVersion = "klein-base-4b".parse().unwrap();
    let info = info.info();
    let encoder = TextEncoder::load(
        &golden().join("klein/text_encoder/model.safetensors"),
        info.text_encoder,
        &TextEncoderOptions::new(info.text_encoder, Device::Cpu, DType::BF16),
    )
    .unwrap();
    let direct = encoder
        .encode(&[""])
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .get(0)
        .unwrap();
    assert_eq!(cached.dims(), direct.dims());
    assert_eq!(cached.dims()[0], 512);
    assert_eq!(values(&cached), values(&direct));

    // 2. Rate 0 is the run without the flag, bit for bit.
    let plain = dir.join("plain");
    run(&train_args(&config, &plain, 4));
    let plain_losses = losses(&plain.join("logs"));
    assert_eq!(plain_losses.len(), 4);
    let zero = dir.join("zero");
    let mut zero_args = train_args(&config, &zero, 4);
    zero_args.extend(strings(&["--caption_dropout_rate", "0"]));
    run(&zero_args);
    assert_eq!(losses(&zero.join("logs")), plain_losses);

    // 3. Rate 1 is training on a copy of the dataset whose text caches are all the empty prompt.
    let all = dir.join("all");
    let mut all_args = train_args(&config, &all, 4);
    all_args.extend(strings(&["--caption_dropout_rate", "1"]));
    run(&all_args);
    let all_losses = losses(&all.join("logs"));
    let empty_copy = dir.join("empty_copy");
    std::fs::create_dir_all(empty_copy.join("cache")).unwrap();
    for entry in std::fs::read_dir(dir.join("cache")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let source = if name.ends_with("_f2k4b_te.safetensors") {
            empty_file.clone()
        } else {
            path.clone()
        };
        std::fs::copy(&source, empty_copy.join("cache").join(&name)).unwrap();
    }
    let copy_config = empty_copy.join("dataset.toml");
    std::fs::write(
        &copy_config,
        std::fs::read_to_string(&config).unwrap().replace(
            &dir.join("cache").display().to_string(),
            &empty_copy.join("cache").display().to_string(),
        ),
    )
    .unwrap();
    let on_empty = dir.join("on_empty");
    run(&train_args(&copy_config, &on_empty, 4));
    assert_eq!(all_losses, losses(&on_empty.join("logs")));
    assert_ne!(all_losses, plain_losses);

    // 4. Rate 0.5: some items dropped, and a run resumed at step 2 drops the same ones.
    let half = dir.join("half");
    let mut half_args = train_args(&config, &half, 4);
    half_args.extend(strings(&[
        "--caption_dropout_rate",
        "0.5",
        "--save_every_n_steps",
        "2",
        "--save_state",
    ]));
    run(&half_args);
    let half_losses = losses(&half.join("logs"));
    assert_ne!(half_losses, plain_losses);
    assert_ne!(half_losses, all_losses);
    let resumed = dir.join("resumed");
    let mut resumed_args = train_args(&config, &resumed, 4);
    resumed_args.extend(strings(&["--caption_dropout_rate", "0.5", "--resume"]));
    resumed_args.push(half.join("e2e-step00000002-state").display().to_string());
    run(&resumed_args);
    assert_eq!(losses(&resumed.join("logs")), half_losses[2..]);

    // 5. Without the empty-prompt file the run stops before training and says what to run.
    std::fs::remove_file(empty_copy.join("cache/empty_prompt.f2k4b_te.safetensors")).unwrap();
    let mut missing = train_args(&copy_config, &dir.join("missing"), 1);
    missing.extend(strings(&["--caption_dropout_rate", "0.1"]));
    let refused = command(&missing);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("empty_prompt.f2k4b_te.safetensors")
            && message.contains("cache-text-encoder-outputs"),
        "{message}"
    );
}
