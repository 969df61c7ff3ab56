//! LoRA training: timestep sampling, the LoRA network, optimizers, schedules and the loop.

pub mod lr_schedule;
pub mod network;
pub mod optim;
pub mod step;
pub mod timesteps;
