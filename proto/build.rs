//! Compiles `hufu/v1/*.proto` with protox (no system protoc) and writes the
//! descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "hufu/v1/status.proto",
        "hufu/v1/admin.proto",
        "hufu/v1/federation.proto",
        "hufu/v1/audit.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("hufu_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::HufuCodec")
        .compile_fds(fds)?;
    Ok(())
}
