//! The FLUX.2 text encoders: Qwen3 (klein) and Mistral-3 (dev), from prompt to the DiT's
//! conditioning.

pub mod attention;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod mistral3;
pub mod qwen3;
pub mod storage;
pub mod tokenizer;

pub use config::TextEncoderConfig;
pub use encoder::{TextEncoder, TextEncoderCheckpoint, TextEncoderOptions};
pub use storage::WeightPlacement;
pub use tokenizer::{PaddingSide, PromptTokenizer, TokenBatch};
