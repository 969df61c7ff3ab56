//! Quantised weight storage.

pub mod fp8;

pub use fp8::{is_fp8_target, quantize, Fp8Mode, Fp8Weight};
