//! The byte classes of the JSON tokenizer ([`super::Tokenizer`]): whitespace, hex digits, the
//! byte order mark, and the fast run through a string's plain bytes, eight at a time.

pub(super) const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// Bytes that end the fast run through a string: the quote, the backslash, control characters
/// (invalid there) and the lead bytes of multi-byte UTF-8.
pub(super) static STRING_STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = b < 0x20 || b == b'"' as usize || b == b'\\' as usize || b >= 0x80;
        b += 1;
    }
    t
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the 8 bytes in `w` is in [`STRING_STOP`]. Each test sets a byte's high bit
/// where the condition may hold, never missing one (a false alarm only costs the slow path).
fn word_stops(w: u64) -> bool {
    let zero = |v: u64| v.wrapping_sub(ONES) & !v;
    let quote = zero(w ^ (ONES * u64::from(b'"')));
    let backslash = zero(w ^ (ONES * u64::from(b'\\')));
    let control = w.wrapping_sub(ONES * 0x20) & !w;
    (quote | backslash | control | w) & HIGHS != 0
}

/// How many bytes at the start of `bytes` need no attention inside a string: eight at a time,
/// then one by one.
pub(super) fn plain_run(bytes: &[u8]) -> usize {
    let mut n = 0;
    for word in bytes.chunks_exact(8) {
        let w = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        if word_stops(w) {
            break;
        }
        n += 8;
    }
    n + bytes[n..]
        .iter()
        .position(|&c| STRING_STOP[usize::from(c)])
        .unwrap_or(bytes.len() - n)
}

pub(super) fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

pub(super) fn hex(b: u8) -> Option<u16> {
    match b {
        b'0'..=b'9' => Some(u16::from(b - b'0')),
        b'a'..=b'f' => Some(u16::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u16::from(b - b'A' + 10)),
        _ => None,
    }
}
