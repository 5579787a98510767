//! The A/B runner (`frisket-eval ab`): held-out shapes protect cases (cases.rs) × conditions
//! (conditions.rs), each a Generate job through the gRPC service (run.rs), scored by the shapes
//! judge and preservation metrics outside the true objects, summarised with paired statistics
//! (stats.rs) into a JSON and HTML report (report.rs). sd-tuned's strength is chosen first on a
//! separate tuning split (tune.rs). With a CLIP, each condition's domain FID against the
//! references (domain_fid.rs).
pub mod cases;
pub mod conditions;
pub mod domain_fid;
pub mod report;
pub mod run;
pub mod stats;
pub mod tune;
