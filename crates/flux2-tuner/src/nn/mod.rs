//! Layers and tensor functions shared by the models.

pub mod amx;
pub mod amx_layout;
pub mod attention;
pub mod flash;
pub mod fused;
pub mod grad_mode;
pub mod host;
pub mod linear;
pub mod lora_dropout;
pub mod matrix;
pub mod norm;
pub mod rope;
pub mod softmax;
pub mod trainable;

pub use linear::{Linear, LoraAdapter};
