//! Links the system's OpenBLAS statically when the `openblas` feature is on (the default), so
//! the binaries need no BLAS installed where they run; a missing library is a build error that
//! says what to install; and tells the tests which CPU features the building machine has.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    host_cpu_features();
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

/// `cfg(host_has_avx512bf16)` where the machine that builds has AVX-512 BF16 and builds for
/// itself: the tests of the bf16 kernels run there and are reported as ignored elsewhere (a
/// test binary runs where `cargo test` built it; a target folder carried to another machine
/// keeps the building machine's answer until `build.rs` runs again).
fn host_cpu_features() {
    println!("cargo:rustc-check-cfg=cfg(host_has_avx512bf16)");
    #[cfg(target_arch = "x86_64")]
    if std::env::var("HOST") == std::env::var("TARGET")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
    {
        println!("cargo:rustc-cfg=host_has_avx512bf16");
    }
}
