//! The A/B runner's parts. stats.rs: paired bootstrap intervals, the Wilcoxon signed-rank test
//! and Holm's correction, checked against numpy/scipy (eval/tests/ab_stats.rs).
pub mod stats;
