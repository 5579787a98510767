// Generates the gRPC types and stubs for everything under proto/, plus the encoded file
// descriptor set that the server's reflection service publishes.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .codec_path("crate::codec::FrisketCodec")
        .file_descriptor_set_path(out_dir.join("frisket_descriptor.bin"))
        .compile_protos(&["proto/frisket/v1/frisket.proto"], &["proto"])?;
    Ok(())
}
