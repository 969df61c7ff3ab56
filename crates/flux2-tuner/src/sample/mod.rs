//! Sampling: the sigma schedule and the Euler sampler.

pub mod denoise;
pub mod schedule;

pub use denoise::{denoise, DenoiseInputs, Guidance, StepReport};
