//! A small deterministic generator (xorshift64*), so failures reproduce
//! from their seed and tests need no extra crate. Shared by the library's
//! and the CLI's test binaries.

/// The generator; `Rng(state)` starts from a raw state, [`Rng::new`] from
/// a seed that may be small.
pub struct Rng(pub u64);

impl Rng {
    /// Spreads a small seed over the state (never zero, which would stick).
    #[allow(dead_code)] // The CLI's tests seed this way; the library's do not.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
