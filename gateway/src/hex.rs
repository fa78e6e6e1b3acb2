//! Lower-case hexadecimal: the one home for rendering bytes as hex (key names, ids).

/// `bytes` as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// `x` as 16 lower-case hex digits, most significant first, eight digits at a time in one
/// register (request ids and trace ids are written on every request).
pub fn u64_digits(x: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&eight((x >> 32) as u32).to_be_bytes());
    out[8..].copy_from_slice(&eight(u32::try_from(x & 0xFFFF_FFFF).unwrap_or(0)).to_be_bytes());
    out
}

/// `x` as 32 lower-case hex digits, most significant first (`u64_digits` of each half).
pub fn u128_digits(x: u128) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&u64_digits(u64::try_from(x >> 64).unwrap_or(0)));
    out[16..].copy_from_slice(&u64_digits(u64::try_from(x & u128::from(u64::MAX)).unwrap_or(0)));
    out
}

/// The 8 hex digits of `n`, one per byte, the first digit in the top byte.
fn eight(n: u32) -> u64 {
    // Spread the nibbles out, one per byte: 0x1234_5678 -> 0x0102_0304_0506_0708.
    let mut v = u64::from(n);
    v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF;
    v = (v | (v << 8)) & 0x00FF_00FF_00FF_00FF;
    v = (v | (v << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
    // Every byte at 10 or above gets 0x27 more ('a' - '0' - 10) on top of '0'.
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    v + 0x3030_3030_3030_3030 + letters * 0x27
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_lower_case_pairs() {
        assert_eq!(super::encode(&[0x00, 0x9f, 0xff]), "009fff");
    }

    #[test]
    fn u64_digits_are_the_bytes_in_hex() {
        let mut x: u64 = 0x0123_4567_89ab_cdef;
        for _ in 0..10_000 {
            assert_eq!(super::u64_digits(x).as_slice(), super::encode(&x.to_be_bytes()).as_bytes(), "{x:x}");
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        }
        for x in [0, u64::MAX, 0xa0a0_a0a0_9f9f_9f9f] {
            assert_eq!(super::u64_digits(x).as_slice(), super::encode(&x.to_be_bytes()).as_bytes());
        }
        for x in [0, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210] {
            assert_eq!(super::u128_digits(x).as_slice(), super::encode(&x.to_be_bytes()).as_bytes());
        }
    }
}
