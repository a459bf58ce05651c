//! A stable hash for values the server stores or compares across restarts: the owner label of
//! an API key, and the fingerprint of an idempotent request.
//!
//! Why not `std::hash::DefaultHasher`: its algorithm is explicitly unspecified and may change
//! between Rust releases, so a label written to SQLite by one build could differ from the label
//! a later build computes for the same key — the key's runs would become invisible to it.
//!
//! The choice: SipHash-1-3 (Aumasson and Bernstein's SipHash with 1 compression and 3
//! finalization rounds), keyed with the fixed key (0, 0), over the input's length as a
//! little-endian `u64` followed by its bytes. That is exactly what `DefaultHasher::new()`
//! produced for `<[u8] as Hash>::hash` up to at least Rust 1.95 on 64-bit little-endian
//! targets, so owner labels written by earlier builds keep matching; written out here, it can
//! no longer change under us. The round function is shared with SipHash-2-4, whose published
//! test vectors check it. The key is public: labels are identifiers, not secrets (API keys are
//! long random strings, so a label does not reveal its key).

/// SipHash with `c` compression rounds and `d` finalization rounds, keyed with (`k0`, `k1`).
fn siphash(c: usize, d: usize, k0: u64, k1: u64, msg: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut blocks = msg.chunks_exact(8);
    for block in &mut blocks {
        let mut b = [0u8; 8];
        b.copy_from_slice(block);
        let m = u64::from_le_bytes(b);
        v[3] ^= m;
        for _ in 0..c {
            round(&mut v);
        }
        v[0] ^= m;
    }
    // The last block: the remaining bytes, and the length (mod 256) in the top byte.
    let mut last = (msg.len() as u64 & 0xff) << 56;
    for (i, byte) in blocks.remainder().iter().enumerate() {
        last |= u64::from(*byte) << (8 * i);
    }
    v[3] ^= last;
    for _ in 0..c {
        round(&mut v);
    }
    v[0] ^= last;
    v[2] ^= 0xff;
    for _ in 0..d {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// The stable 64-bit hash of `bytes` (see the module docs for the exact definition).
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    let mut msg = Vec::with_capacity(8 + bytes.len());
    msg.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    msg.extend_from_slice(bytes);
    siphash(1, 3, 0, 0, &msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference vectors of the SipHash paper (SipHash-2-4, key 00..0f, messages 00..n-1),
    /// checking the round function and the final-block handling.
    #[test]
    fn siphash_2_4_reference_vectors() {
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg: Vec<u8> = (0u8..64).collect();
        let want: [(usize, u64); 5] = [
            (0, 0x726f_db47_dd0e_0e31),
            (1, 0x74f8_39c5_93dc_67fd),
            (7, 0xab02_00f5_8b01_d137),
            (8, 0x93f5_f579_9a93_2462),
            (15, 0xa129_ca61_49be_45e5),
        ];
        for (len, hash) in want {
            assert_eq!(siphash(2, 4, k0, k1, &msg[..len]), hash, "length {len}");
        }
    }

    /// Fixed values: labels already stored with runs must never change. (These equal what
    /// `DefaultHasher` gave for the same keys with Rust 1.95 on x86_64.)
    #[test]
    fn stable_values() {
        assert_eq!(stable_hash(b""), 0xbd60_acb6_58c7_9e45);
        assert_eq!(stable_hash(b"x"), 0x5262_2147_992a_b4ac);
        assert_eq!(stable_hash(b"0123456789abcdef"), 0x3750_d230_93a8_f4ad);
        assert_eq!(stable_hash(b"k1-0123456789abcdef"), 0x4206_ee9b_65e0_f36d);
    }
}
