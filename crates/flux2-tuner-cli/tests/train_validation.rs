//! `train --validation_dataset_config` end to end on the tiny golden models: a held-out dataset
//! is cached like the training one, its loss is logged as `loss/validation` (TensorBoard and
//! JSONL) on the step and epoch schedule, printed, and the training losses are those of a run
//! without validation.

mod common;
use common::{
    cache, command, losses, make_dataset, run, scalars, strings, train_args, TWO_SQUARES,
};

#[test]
fn validation_loss_is_logged_and_leaves_training_unchanged() {
    let dir = std::env::temp_dir().join(format!("flux2-e2e-validation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = make_dataset(&dir.join("train"), &TWO_SQUARES);
    let held_out = make_dataset(&dir.join("held_out"), &[[40, 200, 40], [120, 120, 30]]);
    cache(&config);
    cache(&held_out);

    // Two items, batch size 1: two steps per epoch, so epochs end at steps 2 and 4.
    let plain = dir.join("plain");
    run(&train_args(&config, &plain, 4));
    let validated = dir.join("validated");
    let mut args = train_args(&config, &validated, 4);
    args.extend(strings(&["--validation_dataset_config"]));
    args.push(held_out.display().to_string());
    args.extend(strings(&[
        "--validate_every_n_steps",
        "3",
        "--validation_timesteps",
        "300,700",
    ]));
    let output = run(&args);

    // Training is not disturbed: the same losses, bit for bit.
    let plain_losses = losses(&plain.join("logs"));
    assert_eq!(plain_losses.len(), 4);
    assert_eq!(losses(&validated.join("logs")), plain_losses);

    // Validation after step 3 (every 3 steps) and at the ends of epochs 1 and 2 (steps 2, 4),
    // once each, in the events file and the JSONL log.
    let events = scalars(&validated.join("logs"), "loss/validation");
    assert_eq!(
        events.iter().map(|(step, _)| *step).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert!(
        events.iter().all(|(_, v)| v.is_finite() && *v > 0.0),
        "{events:?}"
    );
    // The LoRA trains between evaluations, so the fixed-noise loss moves.
    assert!(events[0].1 != events[2].1, "{events:?}");
    let jsonl = std::fs::read_to_string(validated.join("logs/e2e.jsonl")).unwrap();
    let logged: Vec<(u64, f64)> = jsonl
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter_map(|line| {
            Some((
                line["step"].as_u64()?,
                line.get("loss/validation")?.as_f64()?,
            ))
        })
        .collect();
    assert_eq!(logged.len(), 3, "{jsonl}");
    for ((step, value), (event_step, event_value)) in logged.iter().zip(&events) {
        assert_eq!(step, event_step);
        assert_eq!(*value as f32, *event_value);
    }
    let printed = String::from_utf8_lossy(&output.stderr);
    assert!(
        printed.contains("step 3: validation loss"),
        "not printed:\n{printed}"
    );

    // A schedule flag without the dataset is refused, naming the flag it needs.
    let mut orphan = train_args(&config, &dir.join("orphan"), 1);
    orphan.extend(strings(&["--validate_every_n_steps", "2"]));
    let refused = command(&orphan);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--validation_dataset_config"));
}
