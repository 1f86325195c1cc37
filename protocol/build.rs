fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so building needs no system package.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto/tandem.proto");
    tonic_prost_build::configure().compile_protos(&["proto/tandem.proto"], &["proto"])?;
    Ok(())
}
