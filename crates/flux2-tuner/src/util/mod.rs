//! Small utilities.

pub mod rng;
pub mod time;
