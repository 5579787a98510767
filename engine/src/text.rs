//! Client-supplied text inside messages and log lines (defined with the API, so that the
//! client quotes as the server does).
pub use frisket_proto::text::{quote, QUOTE_CHARS};
