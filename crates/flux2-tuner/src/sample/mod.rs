//! Sampling: the sigma schedule, the Euler sampler, requests and the generation pipeline.

pub mod denoise;
pub mod generate;
pub mod request;
pub mod schedule;

pub use denoise::{denoise, DenoiseInputs, Guidance, StepReport};
pub use request::{parse_prompt_file, parse_prompt_line, ImageRequest};
