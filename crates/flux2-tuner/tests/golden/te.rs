//! The `te_encode` case: prompts through the variant's text encoder (chat template, tokenizer,
//! truncation and padding, language model, stacked hidden states). Token ids and masks must match
//! exactly; embeddings within the case tolerance, in f32 and bf16. All prompts run as one batch.
//! Prompts, layers, padding side, pad id and length come from the manifest and the model files.

use candle_core::{DType, Tensor};
use flux2_tuner::models::text::tokenizer::render_prompt;
use flux2_tuner::models::text::{PaddingSide, TextEncoder, TextEncoderOptions, TokenBatch};
use flux2_tuner::models::TextEncoderKind;
use serde_json::Value;

use crate::fixtures::{relative_error, tolerance, CaseTensors, FixtureSet, Result};
use crate::report::Report;

/// Runs the token check and the f32 and bf16 embedding checks of one variant's case.
pub fn run(set: &FixtureSet, variant: &Value, case: &Value, id: &str, report: &mut Report) {
    let prepared = match prepare(set, variant, case) {
        Ok(p) => p,
        Err(e) => return report.error(id, &e.to_string()),
    };
    match check_tokens(&prepared) {
        Ok(()) => report.check(&format!("{id}.tokens"), 0.0, 0.0),
        Err(e) => report.error(&format!("{id}.tokens"), &e.to_string()),
    }
    for (dtype, label, key) in [
        (DType::F32, id.to_string(), "f32"),
        (DType::BF16, format!("{id}@bf16"), "bf16"),
    ] {
        let result =
            tolerance(case, &[key]).and_then(|tol| Ok((embedding_error(&prepared, dtype)?, tol)));
        match result {
            Ok((error, tol)) => report.check(&label, error, tol),
            Err(e) => report.error(&label, &e.to_string()),
        }
    }
}

/// What the case needs, read from the manifest.
struct Prepared {
    kind: TextEncoderKind,
    weights: std::path::PathBuf,
    prompts: Vec<String>,
    layers: Vec<usize>,
    max_length: usize,
    tensors: CaseTensors,
    case: Value,
    text_encoder: Value,
}

fn prepare(set: &FixtureSet, variant: &Value, case: &Value) -> Result<Prepared> {
    let text_encoder = variant
        .get("text_encoder")
        .ok_or("variant has no text_encoder")?;
    let kind = match text_encoder["kind"].as_str() {
        Some("qwen3") => TextEncoderKind::Qwen3,
        Some("mistral3") => TextEncoderKind::Mistral3,
        other => return Err(format!("unknown text-encoder kind {other:?}").into()),
    };
    let dir = set.dir.join(
        text_encoder["dir"]
            .as_str()
            .ok_or("text_encoder has no dir")?,
    );
    let weights_file = text_encoder["files"]
        .as_array()
        .and_then(|files| {
            files
                .iter()
                .filter_map(Value::as_str)
                .find(|f| f.ends_with(".safetensors"))
        })
        .ok_or("text_encoder lists no .safetensors file")?;
    let strings = |key: &str| -> Result<Vec<String>> {
        Ok(case[key]
            .as_array()
            .ok_or_else(|| format!("case has no {key}"))?
            .iter()
            .map(|p| p.as_str().map(str::to_string).ok_or("not a string"))
            .collect::<std::result::Result<_, _>>()?)
    };
    let layers = case["hidden_states_layers"]
        .as_array()
        .ok_or("case has no hidden_states_layers")?
        .iter()
        .map(|v| {
            v.as_u64()
                .map(|v| v as usize)
                .ok_or("layer is not an integer")
        })
        .collect::<std::result::Result<_, _>>()?;
    Ok(Prepared {
        kind,
        weights: dir.join(weights_file),
        prompts: strings("prompts")?,
        layers,
        max_length: case["max_sequence_length"]
            .as_u64()
            .ok_or("case has no max_sequence_length")? as usize,
        tensors: set.tensors(case["file"].as_str().ok_or("case has no file")?)?,
        case: case.clone(),
        text_encoder: text_encoder.clone(),
    })
}

fn load(prepared: &Prepared, dtype: DType) -> Result<TextEncoder> {
    let mut options = TextEncoderOptions::new(prepared.kind, crate::fixtures::device(), dtype);
    options.layers = prepared.layers.clone();
    let mut encoder = TextEncoder::load(&prepared.weights, prepared.kind, &options)?;
    encoder.tokenizer.max_length = prepared.max_length;
    Ok(encoder)
}

fn tokenize(prepared: &Prepared, encoder: &TextEncoder) -> Result<TokenBatch> {
    let prompts: Vec<&str> = prepared.prompts.iter().map(String::as_str).collect();
    Ok(encoder.tokenizer.tokenize(&prompts)?)
}

/// Rendered text, padding side and pad id as the manifest records them; ids and masks equal to
/// the golden integers.
fn check_tokens(prepared: &Prepared) -> Result<()> {
    let encoder = load(prepared, DType::F32)?;
    let side = match encoder.tokenizer.padding_side {
        PaddingSide::Left => "left",
        PaddingSide::Right => "right",
    };
    if Some(side) != prepared.case["padding_side"].as_str() {
        return Err(format!(
            "padding side {side}, manifest says {}",
            prepared.case["padding_side"]
        )
        .into());
    }
    let pad = prepared.text_encoder["pad_token_id"].as_u64();
    if pad != Some(u64::from(encoder.tokenizer.pad_token_id)) {
        return Err(format!(
            "pad id {}, manifest says {pad:?}",
            encoder.tokenizer.pad_token_id
        )
        .into());
    }
    let rendered = prepared.case["rendered_text"]
        .as_array()
        .ok_or("case has no rendered_text")?;
    let tokens = tokenize(prepared, &encoder)?;
    for (i, prompt) in prepared.prompts.iter().enumerate() {
        if Some(render_prompt(prepared.kind, prompt).as_str())
            != rendered.get(i).and_then(Value::as_str)
        {
            return Err(format!("p{i}: rendered text differs from the manifest").into());
        }
        for (name, ours) in [
            (
                "input_ids",
                tokens.input_ids[i]
                    .iter()
                    .map(|&v| i64::from(v))
                    .collect::<Vec<_>>(),
            ),
            (
                "attention_mask",
                tokens.attention_mask[i]
                    .iter()
                    .map(|&v| i64::from(v))
                    .collect(),
            ),
        ] {
            let golden: Vec<i64> = prepared
                .tensors
                .get(&format!("p{i}.{name}"))?
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1()?;
            if golden.len() != ours.len() {
                return Err(format!(
                    "p{i}.{name}: {} values, golden has {}",
                    ours.len(),
                    golden.len()
                )
                .into());
            }
            if let Some(j) = (0..ours.len()).find(|&j| ours[j] != golden[j]) {
                return Err(format!("p{i}.{name}[{j}] = {}, golden {}", ours[j], golden[j]).into());
            }
        }
        let real = tokens.attention_mask[i].iter().filter(|&&m| m == 1).count() as u64;
        if prepared.case["n_real_tokens"][i].as_u64() != Some(real) {
            return Err(format!(
                "p{i}: {real} real tokens, manifest says {}",
                prepared.case["n_real_tokens"][i]
            )
            .into());
        }
    }
    Ok(())
}

/// Largest per-prompt relative error of the embeddings, all prompts encoded in one batch.
fn embedding_error(prepared: &Prepared, dtype: DType) -> Result<f64> {
    let encoder = load(prepared, dtype)?;
    let tokens = tokenize(prepared, &encoder)?;
    let embeddings = encoder.encode_tokens(&tokens)?;
    let mut worst = 0f64;
    for i in 0..prepared.prompts.len() {
        let golden: Tensor = prepared.tensors.f32(&format!("p{i}.prompt_embeds"))?;
        let ours = embeddings.narrow(0, i, 1)?.to_dtype(DType::F32)?;
        worst = worst.max(relative_error(&ours, &golden)?);
    }
    Ok(worst)
}
