//! LoRA training: timestep sampling, the LoRA network, optimizers, schedules and the loop.

pub mod data;
pub mod log;
pub mod lr_schedule;
pub mod metadata;
pub mod network;
pub mod optim;
pub mod step;
pub mod timesteps;
pub mod trainer;
