//! The FLUX.2 transformer (BFL `Flux2`): loading with every check done before any compute, and the
//! forward pass of spec §1.3.

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::models::dit::blocks::{
    DoubleStreamBlock, LastLayer, Modulation, ModulationParams, SingleStreamBlock,
};
use crate::models::dit::embeddings::{timestep_embedding, MlpEmbedder};
use crate::models::dit::weights::DitWeights;
use crate::models::dit::DitConfig;
use crate::models::version::ModelVersion;
use crate::nn::rope::RopeTables;
use crate::nn::Linear;

/// Inputs of one forward pass.
///
/// # Shapes
/// - `image_tokens`: `[b, n, 128]` packed latents, followed by any reference-image tokens;
/// - `image_position_ids`: `[b, n, 4]` integer `(t, h, w, l)`;
/// - `text_embeddings`: `[b, l, context_in_dim]`;
/// - `text_position_ids`: `[b, l, 4]`;
/// - `timesteps`: `[b]`, sigma in `[0, 1]`;
/// - `guidance`: `[b]`, only for models with a guidance embedding.
#[derive(Debug, Clone)]
pub struct DitInput<'a> {
    pub image_tokens: &'a Tensor,
    pub image_position_ids: &'a Tensor,
    pub text_embeddings: &'a Tensor,
    pub text_position_ids: &'a Tensor,
    pub timesteps: &'a Tensor,
    pub guidance: Option<&'a Tensor>,
}

/// What [`Flux2Dit::prepare`] computes before the blocks.
pub struct Prepared {
    /// Conditioning vector `[b, hidden]`.
    pub vec: Tensor,
    /// The two `(shift, scale, gate)` triples of the image stream, shared by all double blocks.
    pub img_mod: Vec<ModulationParams>,
    pub txt_mod: Vec<ModulationParams>,
    /// The single triple shared by all single blocks.
    pub single_mod: Vec<ModulationParams>,
    /// Embedded image tokens `[b, n, hidden]` and text tokens `[b, l, hidden]`.
    pub img: Tensor,
    pub txt: Tensor,
    /// RoPE tables of `[txt; img]`.
    pub rope: RopeTables,
}

/// Merges LoRAs into a freshly loaded model (see [`Flux2Dit::load_merged_with_fp8`]).
pub type MergeLoras<'a> = dyn FnMut(&mut Flux2Dit) -> Result<()> + 'a;

/// The FLUX.2 DiT.
#[derive(Debug, Clone)]
pub struct Flux2Dit {
    pub config: DitConfig,
    /// Activation and weight dtype (f32 or bf16).
    pub dtype: DType,
    pub img_in: Linear,
    pub txt_in: Linear,
    pub time_in: MlpEmbedder,
    pub guidance_in: Option<MlpEmbedder>,
    pub double_stream_modulation_img: Modulation,
    pub double_stream_modulation_txt: Modulation,
    pub single_stream_modulation: Modulation,
    pub double_blocks: Vec<DoubleStreamBlock>,
    pub single_blocks: Vec<SingleStreamBlock>,
    pub final_layer: LastLayer,
    /// Block swap (`--blocks_to_swap`): set by `offload::enable_block_swap`, which keeps the
    /// swapped blocks' Linear weights in host memory.
    pub block_swap: Option<std::sync::Arc<crate::offload::BlockSwap>>,
}

/// Infers the configuration of `checkpoint`, checks it against `expected` and validates every key,
/// shape and dtype. Reads headers only.
pub fn check_dit_checkpoint(
    checkpoint: &Checkpoint,
    expected: Option<ModelVersion>,
) -> Result<DitConfig> {
    let config = DitConfig::infer(checkpoint)?;
    if let Some(expected) = expected {
        check_version(checkpoint, &config, expected)?;
    }
    checkpoint.validate(&config.expected_keys(), |_| false)?;
    Ok(config)
}

fn check_version(
    checkpoint: &Checkpoint,
    config: &DitConfig,
    expected: ModelVersion,
) -> Result<()> {
    let info = expected.info();
    if info.dit == *config {
        return Ok(());
    }
    let wrong = |reason: String| {
        Err(Error::WrongModelVersion {
            path: checkpoint.path().to_path_buf(),
            expected: expected.name().to_string(),
            reason,
        })
    };
    let matches = ModelVersion::matching_architecture(config);
    if !matches.is_empty() {
        let names: Vec<&str> = matches.iter().map(|v| v.name()).collect();
        return wrong(format!(
            "they look like {} (hidden size {}, {} double + {} single blocks); pass \
             --model_version {}",
            names.join(" or "),
            config.hidden_size,
            config.depth,
            config.depth_single_blocks,
            names[0]
        ));
    }
    // Not a real size: a small test model. Accept it if it has the version's kind of conditioning.
    let is_real_size = config.head_dim() == 128 && config.hidden_size >= 3072;
    if is_real_size {
        return wrong(format!(
            "hidden size {}, {} double + {} single blocks and context width {} match no FLUX.2 \
             version",
            config.hidden_size, config.depth, config.depth_single_blocks, config.context_in_dim
        ));
    }
    if config.guidance_embed != info.dit.guidance_embed {
        return wrong(format!(
            "{} has {}guidance embedding (guidance_in) but the file has {}",
            expected.name(),
            if info.dit.guidance_embed { "a " } else { "no " },
            if config.guidance_embed { "one" } else { "none" }
        ));
    }
    Ok(())
}

impl Flux2Dit {
    /// Loads a BFL-format DiT, checking it first (see [`check_dit_checkpoint`]).
    pub fn load(
        checkpoint: &Checkpoint,
        expected: Option<ModelVersion>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with_fp8(
            checkpoint,
            expected,
            dtype,
            device,
            crate::quant::Fp8Mode::Off,
        )
    }

    /// [`Flux2Dit::load_with_fp8`] with LoRAs merged into the weights by `merge` (when given):
    /// merging needs the full-precision weights, so the fp8 quantisation then waits for it (as
    /// Musubi); without `merge` each tensor is quantised as it is read.
    pub fn load_merged_with_fp8(
        checkpoint: &Checkpoint,
        expected: Option<ModelVersion>,
        dtype: DType,
        device: &Device,
        fp8: crate::quant::Fp8Mode,
        merge: Option<&mut MergeLoras<'_>>,
    ) -> Result<Self> {
        let Some(merge) = merge else {
            return Self::load_with_fp8(checkpoint, expected, dtype, device, fp8);
        };
        let mut dit = Self::load_with_fp8(
            checkpoint,
            expected,
            dtype,
            device,
            crate::quant::Fp8Mode::Off,
        )?;
        merge(&mut dit)?;
        dit.quantize_blocks(fp8)?;
        Ok(dit)
    }

    /// [`Flux2Dit::load`] with the block linears stored as F8E4M3 (`fp8`), each quantised as it
    /// is read (training's `--fp8_base --fp8_scaled`), so no full-precision copy is ever held.
    pub fn load_with_fp8(
        checkpoint: &Checkpoint,
        expected: Option<ModelVersion>,
        dtype: DType,
        device: &Device,
        fp8: crate::quant::Fp8Mode,
    ) -> Result<Self> {
        let config = check_dit_checkpoint(checkpoint, expected)?;
        let weights = DitWeights {
            checkpoint,
            device: device.clone(),
            dtype,
            fp8,
        };
        let heads = config.num_heads;
        let hidden = config.hidden_size;
        Ok(Self {
            img_in: weights.linear("img_in")?,
            txt_in: weights.linear("txt_in")?,
            time_in: MlpEmbedder::load(&weights, "time_in")?,
            guidance_in: if config.guidance_embed {
                Some(MlpEmbedder::load(&weights, "guidance_in")?)
            } else {
                None
            },
            double_stream_modulation_img: Modulation::load(
                &weights,
                "double_stream_modulation_img",
            )?,
            double_stream_modulation_txt: Modulation::load(
                &weights,
                "double_stream_modulation_txt",
            )?,
            single_stream_modulation: Modulation::load(&weights, "single_stream_modulation")?,
            double_blocks: (0..config.depth)
                .map(|i| DoubleStreamBlock::load(&weights, &format!("double_blocks.{i}"), heads))
                .collect::<Result<_>>()?,
            single_blocks: (0..config.depth_single_blocks)
                .map(|i| {
                    SingleStreamBlock::load(&weights, &format!("single_blocks.{i}"), heads, hidden)
                })
                .collect::<Result<_>>()?,
            final_layer: LastLayer::load(&weights, "final_layer")?,
            block_swap: None,
            config,
            dtype,
        })
    }

    /// The dtype of the activations between the layers: the model's dtype, except while training
    /// (gradient mode) bf16 weights on the CPU. There the activations are f32 and only the matrix
    /// products round their operands to bf16 (`nn::trainable::bf16_weight_linear`), because
    /// candle's CPU bf16 element-wise kernels, which every gradient accumulation of its backward
    /// goes through, are several times slower than f32 ones. On CUDA the activations stay bf16.
    pub fn activation_dtype(&self) -> DType {
        let on_cpu = self.img_in.weight.device().is_cpu();
        if self.dtype == DType::BF16 && on_cpu && crate::nn::grad_mode::enabled() {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// The conditioning vector `time_in(emb(t)) [+ guidance_in(emb(g))]`, `[b, hidden]`.
    fn conditioning(&self, timesteps: &Tensor, guidance: Option<&Tensor>) -> Result<Tensor> {
        let mut vec = self
            .time_in
            .forward(&timestep_embedding(timesteps, self.dtype)?)?;
        if let Some(embedder) = &self.guidance_in {
            let guidance = guidance.ok_or_else(|| {
                Error::Shape(
                    "this model has a guidance embedding: a guidance value is required".into(),
                )
            })?;
            vec = (vec + embedder.forward(&timestep_embedding(guidance, self.dtype)?)?)?;
        }
        Ok(vec)
    }

    /// Everything computed before the blocks: the conditioning vector, the shared modulations,
    /// the embedded image and text tokens and the RoPE tables. None of it carries LoRA, so during
    /// training it needs no gradient.
    pub fn prepare(&self, input: &DitInput) -> Result<Prepared> {
        let vec = self.conditioning(input.timesteps, input.guidance)?;
        let img_mod = self.double_stream_modulation_img.forward(&vec)?;
        let txt_mod = self.double_stream_modulation_txt.forward(&vec)?;
        let single_mod = self.single_stream_modulation.forward(&vec)?;
        let img = self
            .img_in
            .forward(&input.image_tokens.to_dtype(self.activation_dtype())?)?;
        let txt = self
            .txt_in
            .forward(&input.text_embeddings.to_dtype(self.activation_dtype())?)?;
        let (axes, theta) = (&self.config.axes_dim, self.config.theta);
        let rope = RopeTables::cat(
            &RopeTables::new(input.text_position_ids, axes, theta)?,
            &RopeTables::new(input.image_position_ids, axes, theta)?,
        )?;
        Ok(Prepared {
            vec,
            img_mod,
            txt_mod,
            single_mod,
            img,
            txt,
            rope,
        })
    }

    /// The final layer on the joint `[txt; img]` sequence after the last single block: drops the
    /// text tokens and returns f32 `[b, n, 128]`.
    pub fn finish(&self, joint: &Tensor, text_length: usize, vec: &Tensor) -> Result<Tensor> {
        let image_length = joint.dim(1)? - text_length;
        let img = joint.narrow(1, text_length, image_length)?;
        self.final_layer.forward(&img, vec)
    }

    /// Runs the transformer and returns the velocity for every image token, f32 `[b, n, 128]`.
    pub fn forward(&self, input: &DitInput) -> Result<Tensor> {
        let prepared = self.prepare(input)?;
        let (mut img, mut txt) = (prepared.img.clone(), prepared.txt.clone());
        for index in 0..self.double_blocks.len() {
            (img, txt) = self.double_block(index)?.forward(
                &img,
                &txt,
                &prepared.img_mod,
                &prepared.txt_mod,
                &prepared.rope,
            )?;
        }
        let text_length = txt.dim(1)?;
        let mut joint = Tensor::cat(&[&txt, &img], 1)?;
        for index in 0..self.single_blocks.len() {
            joint = self.single_block(index)?.forward(
                &joint,
                &prepared.single_mod[0],
                &prepared.rope,
            )?;
        }
        self.finish(&joint, text_length, &prepared.vec)
    }

    /// Double block `index` ready to compute: with block swap, a copy whose weights were brought
    /// to the device (freed when dropped).
    pub fn double_block(
        &self,
        index: usize,
    ) -> Result<crate::offload::Resident<'_, DoubleStreamBlock>> {
        crate::offload::resident_double(self, index)
    }

    /// Single block `index` ready to compute (see [`Self::double_block`]).
    pub fn single_block(
        &self,
        index: usize,
    ) -> Result<crate::offload::Resident<'_, SingleStreamBlock>> {
        crate::offload::resident_single(self, index)
    }

    /// Stores the block linears as F8E4M3 (Musubi's fp8 targets: never norms, embedders, the
    /// global modulations or the final layer), dequantised on use. Merge LoRAs first.
    pub fn quantize_blocks(&mut self, mode: crate::quant::Fp8Mode) -> Result<usize> {
        let mut count = 0;
        for (path, linear) in self.linears_mut() {
            if crate::quant::is_fp8_target(&format!("{path}.weight")) {
                linear.quantize(mode)?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Every tensor with its BFL key, for saving the model in the original format (for example after
    /// merging LoRAs). Weights are returned in the model's dtype.
    pub fn state_dict(&mut self) -> Vec<(String, Tensor)> {
        let mut tensors: Vec<(String, Tensor)> = self
            .linears_mut()
            .into_iter()
            .map(|(path, linear)| (format!("{path}.weight"), linear.weight.clone()))
            .collect();
        for (i, block) in self.double_blocks.iter().enumerate() {
            for (stream, attention) in [("img", &block.img_attn), ("txt", &block.txt_attn)] {
                let p = format!("double_blocks.{i}.{stream}_attn.norm");
                tensors.push((
                    format!("{p}.query_norm.scale"),
                    attention.norm.query_norm.clone(),
                ));
                tensors.push((
                    format!("{p}.key_norm.scale"),
                    attention.norm.key_norm.clone(),
                ));
            }
        }
        for (i, block) in self.single_blocks.iter().enumerate() {
            let p = format!("single_blocks.{i}.norm");
            tensors.push((
                format!("{p}.query_norm.scale"),
                block.norm.query_norm.clone(),
            ));
            tensors.push((format!("{p}.key_norm.scale"), block.norm.key_norm.clone()));
        }
        tensors
    }

    /// The Linear layers of every block (the ones LoRA targets), double blocks first.
    pub fn block_linears(&self) -> impl Iterator<Item = &Linear> {
        let doubles = self.double_blocks.iter().flat_map(|block| block.linears());
        let singles = self.single_blocks.iter().flat_map(|block| block.linears());
        doubles.chain(singles)
    }

    /// Every linear layer with its BFL module path (`double_blocks.0.img_attn.qkv`, ...), for
    /// attaching or merging LoRA adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out: Vec<(String, &mut Linear)> = vec![
            ("img_in".into(), &mut self.img_in),
            ("txt_in".into(), &mut self.txt_in),
            ("time_in.in_layer".into(), &mut self.time_in.in_layer),
            ("time_in.out_layer".into(), &mut self.time_in.out_layer),
            (
                "double_stream_modulation_img.lin".into(),
                &mut self.double_stream_modulation_img.lin,
            ),
            (
                "double_stream_modulation_txt.lin".into(),
                &mut self.double_stream_modulation_txt.lin,
            ),
            (
                "single_stream_modulation.lin".into(),
                &mut self.single_stream_modulation.lin,
            ),
            (
                "final_layer.adaLN_modulation.1".into(),
                &mut self.final_layer.ada_ln_modulation,
            ),
            ("final_layer.linear".into(), &mut self.final_layer.linear),
        ];
        if let Some(guidance) = &mut self.guidance_in {
            out.push(("guidance_in.in_layer".into(), &mut guidance.in_layer));
            out.push(("guidance_in.out_layer".into(), &mut guidance.out_layer));
        }
        for (i, block) in self.double_blocks.iter_mut().enumerate() {
            let p = format!("double_blocks.{i}");
            out.push((format!("{p}.img_attn.qkv"), &mut block.img_attn.qkv));
            out.push((format!("{p}.img_attn.proj"), &mut block.img_attn.proj));
            out.push((format!("{p}.img_mlp.0"), &mut block.img_mlp.layer_0));
            out.push((format!("{p}.img_mlp.2"), &mut block.img_mlp.layer_2));
            out.push((format!("{p}.txt_attn.qkv"), &mut block.txt_attn.qkv));
            out.push((format!("{p}.txt_attn.proj"), &mut block.txt_attn.proj));
            out.push((format!("{p}.txt_mlp.0"), &mut block.txt_mlp.layer_0));
            out.push((format!("{p}.txt_mlp.2"), &mut block.txt_mlp.layer_2));
        }
        for (i, block) in self.single_blocks.iter_mut().enumerate() {
            out.push((format!("single_blocks.{i}.linear1"), &mut block.linear1));
            out.push((format!("single_blocks.{i}.linear2"), &mut block.linear2));
        }
        out
    }
}
