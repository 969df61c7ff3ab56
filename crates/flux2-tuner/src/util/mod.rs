//! Small utilities.

pub mod rng;
