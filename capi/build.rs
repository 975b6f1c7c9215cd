//! Generates the C header with cbindgen into OUT_DIR/speckv.h; the committed `include/speckv.h`
//! must equal it (a test checks; `SPECKV_WRITE_HEADER=1 cargo build -p speckv-capi` rewrites it).

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("speckv.h");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=../kernels/src/params.rs");
    println!("cargo:rerun-if-env-changed=SPECKV_WRITE_HEADER");
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("capi/cbindgen.toml");
    match cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
    {
        Ok(b) => {
            let mut bytes = Vec::new();
            b.write(&mut bytes);
            let text = String::from_utf8(bytes).expect("cbindgen writes UTF-8");
            // The kernels' `FeatureAccum::EMPTY` is Rust-only (cbindgen renders its infinities as
            // undefined names): leave it and its comment out.
            // Likewise `StopState::START`.
            let text = text
                .replace("/*\n The state before any drafted token.\n */\n", "")
                .replace("/*\n Before a step's first draft.\n */\n", "");
            let text: String = text
                .lines()
                .filter(|l| !l.contains("_EMPTY (") && !l.contains("_START ("))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&out, &text).unwrap();
            if std::env::var("SPECKV_WRITE_HEADER").as_deref() == Ok("1") {
                std::fs::write(crate_dir.join("../include/speckv.h"), &text).unwrap();
            }
        }
        Err(e) => {
            println!("cargo:warning=cbindgen could not generate the header: {e}");
            std::fs::write(&out, format!("/* cbindgen failed: {e} */\n")).unwrap();
        }
    }
}
