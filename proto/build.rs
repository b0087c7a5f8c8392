//! Compiles the lienthong .proto schema with protox (pure Rust), so no system `protoc`
//! is needed on any machine that builds lienthong.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        ["lienthong/v1/document.proto", "lienthong/v1/exchange.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .bytes(".lienthong.v1.Signed.payload")
        .bytes(".lienthong.v1.AttachmentChunk.data")
        .bytes(".lienthong.v1.Delivery.attachments")
        .bytes(".lienthong.v1.DeliveryChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
