//! Generates the gRPC messages, servers and clients from `proto/`, with the vendored `protoc`
//! (a fresh machine needs nothing installed), and the descriptor set server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("skald/v1/skald.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_transport(false)
        .file_descriptor_set_path(out.join("skald_descriptor.bin"))
        .compile_with_config(config, &[proto], &[root])?;
    Ok(())
}
