//! The one step every hash of the probes is built from: the request hash of the repeat
//! shortcut ([`crate::fastpath`]), the key hash of the served-key tally ([`crate::resp`]) and
//! the order-free hash of a key list ([`crate::args_hash`]). One multiply and one shift, so
//! that the kernel side can run it per word of a 20 KiB key list.

const MULTIPLIER: u64 = 0xff51_afd7_ed55_8ccd;

/// Folds `word` into the hash `h`.
#[inline(always)]
pub(crate) fn mix(h: u64, word: u64) -> u64 {
    let h = (h ^ word).wrapping_mul(MULTIPLIER);
    h ^ (h >> 31)
}
