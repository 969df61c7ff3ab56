//! Small utilities.

pub mod memory;
pub mod rng;
pub mod time;
