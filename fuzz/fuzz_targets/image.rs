//! Image bytes → the server's header read and limited decode.
#![no_main]
mod shared;

libfuzzer_sys::fuzz_target!(|data: &[u8]| shared::load(data));
