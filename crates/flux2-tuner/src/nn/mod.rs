//! Layers and tensor functions shared by the models.

pub mod attention;
pub mod linear;
pub mod norm;
pub mod rope;

pub use linear::{Linear, LoraAdapter};
