//! The LUKS1 header parser and key-slot unlocking on hostile bytes: no
//! panic, no buffer sized by an unchecked field, errors instead.

use oxcow::fuzz_targets::luks_header;
use proptest::prelude::*;

/// A well-formed header (aes-256 xts-plain64, sha256, one active slot,
/// one PBKDF2 iteration) for mutations to start from.
fn header() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[..6].copy_from_slice(b"LUKS\xba\xbe");
    b[6..8].copy_from_slice(&1u16.to_be_bytes());
    b[8..11].copy_from_slice(b"aes");
    b[40..51].copy_from_slice(b"xts-plain64");
    b[72..78].copy_from_slice(b"sha256");
    b[104..108].copy_from_slice(&4096u32.to_be_bytes());
    b[108..112].copy_from_slice(&64u32.to_be_bytes());
    b[164..168].copy_from_slice(&1u32.to_be_bytes());
    b[208..212].copy_from_slice(&0x00AC_71F3u32.to_be_bytes());
    b[212..216].copy_from_slice(&1u32.to_be_bytes());
    b[248..252].copy_from_slice(&8u32.to_be_bytes());
    b[252..256].copy_from_slice(&4000u32.to_be_bytes());
    b
}

#[test]
fn luks_header_parses_the_template_and_refuses_a_wrong_password() {
    let h = oxcow::crypto::LuksHeader::parse(&header()).expect("parses");
    assert_eq!(h.alg.name(), "aes-256");
    assert_eq!(h.mode.name(), "xts");
    let read = |buf: &mut [u8], _off: u64| -> oxcow::Result<()> {
        buf.fill(0);
        Ok(())
    };
    let e = h.unlock(&oxcow::crypto::Secret::new(b"pw".to_vec()), &read).expect_err("no key matches");
    assert!(e.to_string().contains("Invalid password"), "{e}");
}

#[test]
fn luks_header_with_huge_stripes_is_refused() {
    let mut b = header();
    b[252..256].copy_from_slice(&u32::MAX.to_be_bytes());
    let h = oxcow::crypto::LuksHeader::parse(&b).expect("parses");
    let read = |_: &mut [u8], _: u64| -> oxcow::Result<()> { panic!("must not read") };
    assert!(h.unlock(&oxcow::crypto::Secret::new(b"pw".to_vec()), &read).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn luks_header_mutations_never_panic(edits in proptest::collection::vec((0usize..600, any::<u8>()), 1..16)) {
        let mut b = header();
        for (i, v) in edits {
            b[i] = v;
        }
        luks_header(&b);
    }
}
