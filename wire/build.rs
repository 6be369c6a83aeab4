//! Compiles `proto/vigil.proto` into Rust with prost-build, parsing the file with protox
//! (pure Rust) so that no system `protoc` is needed on any machine that builds vigil.

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let proto_dir = manifest_dir.join("proto");
    let proto = proto_dir.join("vigil.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let fds = match protox::compile([&proto], [&proto_dir]) {
        Ok(fds) => fds,
        Err(err) => {
            // protox errors carry a source span; print them whole so the build log says where.
            eprintln!("error: {}: {err:?}", proto.display());
            std::process::exit(1);
        }
    };
    if let Err(err) = prost_build::Config::new().compile_fds(fds) {
        eprintln!(
            "error: prost-build could not generate code for {}: {err}",
            proto.display()
        );
        std::process::exit(1);
    }
}
