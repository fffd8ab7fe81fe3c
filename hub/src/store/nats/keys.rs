//! Turning arbitrary text (device ids, consumer-group names) into NATS KV keys and
//! subject tokens, and back. KV keys allow only `[-/_=.a-zA-Z0-9]`, and `.` separates
//! subject tokens, so every byte outside `[-_a-zA-Z0-9]` is written `=XX` (upper-case
//! hex); `=` itself is escaped too, so the mapping is reversible.

/// The key (or subject token) for `text`.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(char::from(byte));
        } else {
            out.push('=');
            out.push_str(&format!("{byte:02X}"));
        }
    }
    out
}

/// The text a key was made from, or `None` for a key [`encode`] never makes.
pub fn decode(key: &str) -> Option<String> {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'=' {
            let hex = key.get(at + 1..at + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn device_id_punctuation_becomes_key_safe() {
        assert_eq!(encode("sensor-1_a"), "sensor-1_a");
        assert_eq!(encode("a.b:c"), "a=2Eb=3Ac");
        assert_eq!(encode("x=y"), "x=3Dy");
        assert_eq!(decode("a=2Eb=3Ac").as_deref(), Some("a.b:c"));
        assert_eq!(decode("bad=G1"), None);
        assert_eq!(decode("short=4"), None);
    }

    proptest! {
        #[test]
        fn encoding_round_trips_and_stays_in_the_key_alphabet(text in "\\PC{0,40}") {
            let key = encode(&text);
            prop_assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)));
            prop_assert_eq!(decode(&key), Some(text));
        }
    }
}
