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

#[cfg(test)]
mod tests {
    #[test]
    fn renders_lower_case_pairs() {
        assert_eq!(super::encode(&[0x00, 0x9f, 0xff]), "009fff");
    }
}
