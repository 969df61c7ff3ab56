//! The decoder-only language-model stack shared by Qwen3 and Mistral (transformers
//! `Qwen3Model` / `MistralModel`): token embedding, pre-norm decoder layers (RMSNorm, GQA
//! self-attention with RoPE, SwiGLU MLP) and the final norm. Qwen3 adds a per-head RMSNorm on
//! queries and keys before RoPE. Only the layers up to the deepest requested hidden state are
//! loaded and run.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::checkpoint::{Checkpoint, KeySpec};
use crate::error::{Error, Result};
use crate::models::text::attention::{masked_attention, CausalPaddingMask, RotaryTables};
use crate::models::text::config::TextEncoderConfig;
use crate::models::text::storage::{StoredWeight, WeightPlacement, WeightRole};
use crate::nn::norm::rms_norm;

/// Where the language model's tensors sit in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// Prefix of `embed_tokens`, `layers.N` and `norm`, with its trailing dot.
    pub model_prefix: String,
    /// Full name of the (unused) output projection.
    pub lm_head: String,
}

impl KeyLayout {
    /// The standard causal-LM layout (`model.*`, `lm_head.weight`).
    pub fn causal_lm() -> Self {
        Self {
            model_prefix: "model.".into(),
            lm_head: "lm_head.weight".into(),
        }
    }

    /// `{model_prefix}{name}`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.model_prefix)
    }
}

/// Every tensor of the language model except the output projection, with its shape.
pub fn language_model_keys(config: &TextEncoderConfig, layout: &KeyLayout) -> Vec<KeySpec> {
    let h = config.hidden_size;
    let q = config.num_attention_heads * config.head_dim;
    let kv = config.num_key_value_heads * config.head_dim;
    let m = config.intermediate_size;
    let mut keys = vec![
        KeySpec::new(layout.key("embed_tokens.weight"), &[config.vocab_size, h]),
        KeySpec::new(layout.key("norm.weight"), &[h]),
    ];
    for i in 0..config.num_hidden_layers {
        let p = layout.key(&format!("layers.{i}"));
        keys.push(KeySpec::new(format!("{p}.input_layernorm.weight"), &[h]));
        keys.push(KeySpec::new(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
        ));
        keys.push(KeySpec::new(
            format!("{p}.self_attn.q_proj.weight"),
            &[q, h],
        ));
        keys.push(KeySpec::new(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv, h],
        ));
        keys.push(KeySpec::new(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv, h],
        ));
        keys.push(KeySpec::new(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, q],
        ));
        if config.has_qk_norm() {
            keys.push(KeySpec::new(
                format!("{p}.self_attn.q_norm.weight"),
                &[config.head_dim],
            ));
            keys.push(KeySpec::new(
                format!("{p}.self_attn.k_norm.weight"),
                &[config.head_dim],
            ));
        }
        keys.push(KeySpec::new(format!("{p}.mlp.gate_proj.weight"), &[m, h]));
        keys.push(KeySpec::new(format!("{p}.mlp.up_proj.weight"), &[m, h]));
        keys.push(KeySpec::new(format!("{p}.mlp.down_proj.weight"), &[h, m]));
    }
    keys
}

/// Number of decoder layers stored under `layout` (one more than the largest `layers.N`).
pub fn stored_layer_count(checkpoint: &Checkpoint, layout: &KeyLayout) -> usize {
    let prefix = layout.key("layers.");
    checkpoint
        .keys()
        .filter_map(|k| {
            k.strip_prefix(&prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |last| last + 1)
}

/// `self_attn`: q/k/v/o projections, and Qwen3's per-head q/k norms.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub q_proj: StoredWeight,
    pub k_proj: StoredWeight,
    pub v_proj: StoredWeight,
    pub o_proj: StoredWeight,
    pub q_norm: Option<StoredWeight>,
    pub k_norm: Option<StoredWeight>,
}

/// `mlp`: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: StoredWeight,
    pub up_proj: StoredWeight,
    pub down_proj: StoredWeight,
}

/// `layers.N`: pre-norm attention and MLP, each added to the residual stream.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: StoredWeight,
    pub self_attn: SelfAttention,
    pub post_attention_layernorm: StoredWeight,
    pub mlp: Mlp,
}

/// The weights of one layer on the compute device, for the duration of its forward pass.
struct ActiveLayer {
    input_layernorm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attention_layernorm: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

/// `x W^T` for f32 `x` `[b, l, in]` and `W` `[out, in]` in the compute dtype; returns f32.
///
/// With 16-bit weights, `x` is split into two 16-bit terms `hi + lo` (`hi` = `x` rounded,
/// `lo` = the rounding remainder) and both go through one GEMM of twice the rows: the input then
/// keeps about 16 mantissa bits instead of 8, and only the output rounding remains. Measured on
/// dev's golden tiny model (30 layers, bf16 against f32): input rounding alone 2.0e-2, output
/// rounding alone 1.4e-2, both 3.0e-2 without the split and 1.8e-2 with it; twice the GEMM work,
/// still far cheaper than f32 GEMMs on tensor-core GPUs.
fn project(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (batch, length, width) = x.dims3()?;
    let rows = batch * length;
    let x = x.reshape((rows, width))?;
    let compute = weight.dtype();
    let y = if compute == DType::F32 {
        x.matmul(&weight.t()?)?
    } else {
        let high = x.to_dtype(compute)?;
        let low = (&x - high.to_dtype(DType::F32)?)?.to_dtype(compute)?;
        let both = Tensor::cat(&[&high, &low], 0)?
            .matmul(&weight.t()?)?
            .to_dtype(DType::F32)?;
        (both.narrow(0, 0, rows)? + both.narrow(0, rows, rows)?)?
    };
    Ok(y.reshape((batch, length, weight.dim(0)?))?)
}

impl DecoderLayer {
    fn load(
        checkpoint: &Arc<Checkpoint>,
        prefix: &str,
        config: &TextEncoderConfig,
        placement: &WeightPlacement,
    ) -> Result<Self> {
        let weight = |name: &str, role: WeightRole| {
            StoredWeight::load(
                checkpoint,
                &format!("{prefix}.{name}.weight"),
                placement,
                role,
            )
        };
        let norm = |name: &str| -> Result<Option<StoredWeight>> {
            if config.has_qk_norm() {
                Ok(Some(weight(name, WeightRole::Dense)?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            input_layernorm: weight("input_layernorm", WeightRole::Dense)?,
            self_attn: SelfAttention {
                q_proj: weight("self_attn.q_proj", WeightRole::Projection)?,
                k_proj: weight("self_attn.k_proj", WeightRole::Projection)?,
                v_proj: weight("self_attn.v_proj", WeightRole::Projection)?,
                o_proj: weight("self_attn.o_proj", WeightRole::Projection)?,
                q_norm: norm("self_attn.q_norm")?,
                k_norm: norm("self_attn.k_norm")?,
            },
            post_attention_layernorm: weight("post_attention_layernorm", WeightRole::Dense)?,
            mlp: Mlp {
                gate_proj: weight("mlp.gate_proj", WeightRole::Projection)?,
                up_proj: weight("mlp.up_proj", WeightRole::Projection)?,
                down_proj: weight("mlp.down_proj", WeightRole::Projection)?,
            },
        })
    }

    /// Copies (and dequantises) the layer's weights onto the compute device.
    fn activate(&self, placement: &WeightPlacement) -> Result<ActiveLayer> {
        let optional = |w: &Option<StoredWeight>| w.as_ref().map(|w| w.get(placement)).transpose();
        Ok(ActiveLayer {
            input_layernorm: self.input_layernorm.get(placement)?,
            q_proj: self.self_attn.q_proj.get(placement)?,
            k_proj: self.self_attn.k_proj.get(placement)?,
            v_proj: self.self_attn.v_proj.get(placement)?,
            o_proj: self.self_attn.o_proj.get(placement)?,
            q_norm: optional(&self.self_attn.q_norm)?,
            k_norm: optional(&self.self_attn.k_norm)?,
            post_attention_layernorm: self.post_attention_layernorm.get(placement)?,
            gate_proj: self.mlp.gate_proj.get(placement)?,
            up_proj: self.mlp.up_proj.get(placement)?,
            down_proj: self.mlp.down_proj.get(placement)?,
        })
    }

    /// Every stored tensor of the layer.
    fn stored(&self) -> Vec<&StoredWeight> {
        let mut all = vec![
            &self.input_layernorm,
            &self.self_attn.q_proj,
            &self.self_attn.k_proj,
            &self.self_attn.v_proj,
            &self.self_attn.o_proj,
            &self.post_attention_layernorm,
            &self.mlp.gate_proj,
            &self.mlp.up_proj,
            &self.mlp.down_proj,
        ];
        all.extend(self.self_attn.q_norm.iter());
        all.extend(self.self_attn.k_norm.iter());
        all
    }
}

impl ActiveLayer {
    /// # Shapes
    /// `hidden`: `[b, l, hidden]` f32; returns the same.
    fn forward(
        &self,
        hidden: &Tensor,
        config: &TextEncoderConfig,
        rope: &RotaryTables,
        mask: &CausalPaddingMask,
    ) -> Result<Tensor> {
        let eps = config.rms_norm_eps;
        let (batch, length, _) = hidden.dims3()?;
        let heads = |x: Tensor, count: usize, norm: &Option<Tensor>| -> Result<Tensor> {
            let x = x.reshape((batch, length, count, config.head_dim))?;
            let x = match norm {
                Some(scale) => rms_norm(&x, scale, eps)?,
                None => x,
            };
            Ok(x.transpose(1, 2)?.contiguous()?)
        };
        // Only the projections run in the weights' compute dtype: the residual stream, norms,
        // RoPE, attention and the SwiGLU product stay f32 (they are a small part of the work).
        let x = rms_norm(hidden, &self.input_layernorm, eps)?;
        let q = heads(
            project(&x, &self.q_proj)?,
            config.num_attention_heads,
            &self.q_norm,
        )?;
        let k = heads(
            project(&x, &self.k_proj)?,
            config.num_key_value_heads,
            &self.k_norm,
        )?;
        let v = heads(
            project(&x, &self.v_proj)?,
            config.num_key_value_heads,
            &None,
        )?;
        let attention = masked_attention(&rope.apply(&q)?, &rope.apply(&k)?, &v, mask)?;
        let hidden = (hidden + project(&attention, &self.o_proj)?)?;
        let x = rms_norm(&hidden, &self.post_attention_layernorm, eps)?;
        let gate = candle_nn::ops::silu(&project(&x, &self.gate_proj)?)?;
        let mlp = project(&(gate * project(&x, &self.up_proj)?)?, &self.down_proj)?;
        Ok((hidden + mlp)?)
    }
}

/// The language model, truncated after the deepest hidden state it is asked for.
#[derive(Debug, Clone)]
pub struct DecoderStack {
    pub config: TextEncoderConfig,
    pub placement: WeightPlacement,
    pub embed_tokens: StoredWeight,
    /// Layers `0..n` where `n` is the deepest requested hidden-state index.
    pub layers: Vec<DecoderLayer>,
    /// The final norm, loaded only when `hidden_states[num_hidden_layers]` is requested.
    pub norm: Option<StoredWeight>,
}

impl DecoderStack {
    /// Loads what `hidden_states[k]` for every `k` in `outputs` needs from a validated checkpoint.
    pub fn load(
        checkpoint: &Arc<Checkpoint>,
        layout: &KeyLayout,
        config: &TextEncoderConfig,
        outputs: &[usize],
        placement: &WeightPlacement,
    ) -> Result<Self> {
        let deepest = outputs.iter().copied().max().unwrap_or(0);
        if deepest > config.num_hidden_layers {
            return Err(Error::InvalidArgument {
                name: "text-encoder layers".into(),
                message: format!(
                    "hidden_states[{deepest}] requested but the model has {} layers (indices 0..={})",
                    config.num_hidden_layers, config.num_hidden_layers
                ),
            });
        }
        let layers = (0..deepest.min(config.num_hidden_layers))
            .map(|i| {
                DecoderLayer::load(
                    checkpoint,
                    &layout.key(&format!("layers.{i}")),
                    config,
                    placement,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = if deepest == config.num_hidden_layers {
            Some(StoredWeight::load(
                checkpoint,
                &layout.key("norm.weight"),
                placement,
                WeightRole::Dense,
            )?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            placement: placement.clone(),
            embed_tokens: StoredWeight::load(
                checkpoint,
                &layout.key("embed_tokens.weight"),
                placement,
                WeightRole::Dense,
            )?,
            layers,
            norm,
        })
    }

    /// Bytes held by the loaded weights in their storage form.
    pub fn stored_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .flat_map(|l| l.stored())
            .map(StoredWeight::bytes)
            .sum();
        layers + self.embed_tokens.bytes() + self.norm.as_ref().map_or(0, StoredWeight::bytes)
    }

    /// `hidden_states[k]` for each `k` of `outputs`, in that order: index 0 is the embedding,
    /// index `k` the residual stream after `k` layers, index `num_hidden_layers` after the final
    /// norm. Position ids are `0..l` whatever the padding.
    ///
    /// # Shapes
    /// `input_ids`: `[b, l]` (u32); `attention_mask`: `b` rows of `l` (1 = token, 0 = pad);
    /// returns f32 tensors `[b, l, hidden]` (the residual stream is kept in f32 whatever the
    /// compute dtype, which keeps bf16 runs close to the f32 reference).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: &[Vec<u8>],
        outputs: &[usize],
    ) -> Result<Vec<Tensor>> {
        let placement = &self.placement;
        let (batch, length) = input_ids.dims2()?;
        if attention_mask.len() != batch {
            return Err(Error::Shape(format!(
                "{} attention-mask rows for a batch of {batch}",
                attention_mask.len()
            )));
        }
        for &k in outputs {
            if k > self.layers.len() && !(k == self.config.num_hidden_layers && self.norm.is_some())
            {
                return Err(Error::InvalidArgument {
                    name: "text-encoder layers".into(),
                    message: format!(
                        "hidden_states[{k}] was not loaded (deepest loaded: {})",
                        self.layers.len()
                    ),
                });
            }
        }
        // The embedding lookup runs where the table is stored (host memory when streaming).
        let table = self.embed_tokens.get_stored()?;
        let ids = input_ids
            .to_device(table.device())?
            .to_dtype(DType::U32)?
            .flatten_all()?;
        let embedded =
            table
                .index_select(&ids, 0)?
                .reshape((batch, length, self.config.hidden_size))?;
        let mut hidden = embedded
            .to_device(&placement.device)?
            .to_dtype(DType::F32)?;
        let rope = RotaryTables::new(
            length,
            self.config.head_dim,
            self.config.rope_theta,
            &placement.device,
        )?;
        let mask = CausalPaddingMask::new(attention_mask, &placement.device)?;
        let mut states: Vec<Option<Tensor>> = vec![None; outputs.len()];
        let mut record = |index: usize, hidden: &Tensor| {
            for (slot, &k) in states.iter_mut().zip(outputs) {
                if k == index {
                    *slot = Some(hidden.clone());
                }
            }
        };
        record(0, &hidden);
        for (i, layer) in self.layers.iter().enumerate() {
            hidden = layer
                .activate(placement)?
                .forward(&hidden, &self.config, &rope, &mask)?;
            if i + 1 < self.config.num_hidden_layers {
                record(i + 1, &hidden);
            }
        }
        if let Some(norm) = &self.norm {
            let normed = rms_norm(&hidden, &norm.get(placement)?, self.config.rms_norm_eps)?;
            record(self.config.num_hidden_layers, &normed);
        }
        states
            .into_iter()
            .zip(outputs)
            .map(|(s, k)| {
                s.ok_or_else(|| Error::Shape(format!("hidden_states[{k}] was not computed")))
            })
            .collect()
    }
}
