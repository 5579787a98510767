//! Client-supplied text inside messages and log lines. A value is quoted escaped (so a
//! newline or an ANSI escape cannot forge a log line or recolour a terminal) and cut to
//! `QUOTE_CHARS` characters with its full length given (so a huge value cannot inflate an
//! error status past the transport's metadata limit).

/// The most characters of a value that a message repeats.
pub const QUOTE_CHARS: usize = 100;

/// `value` as a Rust string literal: escaped, at most `QUOTE_CHARS` characters, followed by
/// "… (N bytes)" when it was cut.
pub fn quote(value: &str) -> String {
    match value.char_indices().nth(QUOTE_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_escaped_whole() {
        assert_eq!(quote("ddim"), "\"ddim\"");
        assert_eq!(quote("a\nINFO forged\u{1b}[31m"), "\"a\\nINFO forged\\u{1b}[31m\"");
    }

    #[test]
    fn long_values_are_cut_with_their_length() {
        let long = "é".repeat(1_000_000);
        let q = quote(&long);
        assert!(q.len() < 300, "{}", q.len());
        assert!(q.ends_with("… (2000000 bytes)"), "{q}");
        assert!(!quote(&"\n".repeat(500)).contains('\n'));
    }
}
