//! Sampling: the sigma schedule.

pub mod schedule;
