//! LoRA training: timestep sampling, the LoRA network, optimizers, schedules and the loop.

pub mod base_weights;
pub mod caption_dropout;
pub mod data;
pub mod direct;
mod dropout_replay;
pub mod log;
pub mod lr_schedule;
pub mod masked_loss;
pub mod max_norm;
pub mod metadata;
pub mod network;
pub mod optim;
pub mod sample_prompts;
pub mod samples;
pub mod step;
pub mod timesteps;
pub mod trainer;
pub mod validation;
