//! Link options of the `oxcow` binary.

fn main() {
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|o| o == "linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|e| e == "gnu");
    if linux_gnu {
        // Relative relocations packed (DT_RELR, glibc 2.36): the loader
        // reads a few KiB at start instead of a quarter of a MiB of
        // relocation entries, so every process starts smaller (issue 19:
        // `oxcow serve`'s peak memory).
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
