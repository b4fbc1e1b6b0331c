//! Links the system's OpenBLAS statically when the `openblas` feature is on (the default), so
//! the binaries need no BLAS installed where they run; a missing library is a build error that
//! says what to install.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_OPENBLAS").is_none() {
        return;
    }
    let library = pkg_config::Config::new().cargo_metadata(false).probe("openblas").unwrap_or_else(|error| {
        panic!(
            "the `openblas` feature needs OpenBLAS (Debian: `apt-get install libopenblas-dev`, or run \
             scripts/setup-system.sh), or build with `--no-default-features`: {error}"
        )
    });
    for dir in &library.link_paths {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    println!("cargo:rustc-link-lib=static=openblas");
}
