//! The hashes LUKS names (`hash-spec`): PBKDF2 and the AF diffusion.

use crate::{Error, Result};
use sha2::Digest;

/// A hash algorithm LUKS headers name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// MD5.
    Md5,
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// RIPEMD-160.
    Ripemd160,
    /// SM3.
    Sm3,
}

impl Hash {
    /// Parses the header's (and qemu-img's) name.
    pub fn from_name(s: &str) -> Result<Hash> {
        Ok(match s {
            "md5" => Hash::Md5,
            "sha1" => Hash::Sha1,
            "sha224" => Hash::Sha224,
            "sha256" => Hash::Sha256,
            "sha384" => Hash::Sha384,
            "sha512" => Hash::Sha512,
            "ripemd160" => Hash::Ripemd160,
            "sm3" => Hash::Sm3,
            other => return Err(Error::unsupported(format!("hash algorithm '{other}'"))),
        })
    }
    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Md5 => "md5",
            Hash::Sha1 => "sha1",
            Hash::Sha224 => "sha224",
            Hash::Sha256 => "sha256",
            Hash::Sha384 => "sha384",
            Hash::Sha512 => "sha512",
            Hash::Ripemd160 => "ripemd160",
            Hash::Sm3 => "sm3",
        }
    }
    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Hash::Md5 => 16,
            Hash::Sha1 | Hash::Ripemd160 => 20,
            Hash::Sha224 => 28,
            Hash::Sha256 | Hash::Sm3 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }
    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            Hash::Md5 => run::<md5::Md5>(parts),
            Hash::Sha1 => run::<sha1::Sha1>(parts),
            Hash::Sha224 => run::<sha2::Sha224>(parts),
            Hash::Sha256 => run::<sha2::Sha256>(parts),
            Hash::Sha384 => run::<sha2::Sha384>(parts),
            Hash::Sha512 => run::<sha2::Sha512>(parts),
            Hash::Ripemd160 => run::<ripemd::Ripemd160>(parts),
            Hash::Sm3 => run::<sm3::Sm3>(parts),
        }
    }
    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            Hash::Md5 => pbkdf2_hmac::<md5::Md5>(password, salt, iterations, out),
            Hash::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
            Hash::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out),
            Hash::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
            Hash::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out),
            Hash::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
            Hash::Ripemd160 => pbkdf2_hmac::<ripemd::Ripemd160>(password, salt, iterations, out),
            Hash::Sm3 => pbkdf2_hmac::<sm3::Sm3>(password, salt, iterations, out),
        }
    }
}
