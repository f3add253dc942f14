//! Finding a secret in text in any form a reader could decode back to it.
//!
//! Text is read one *unit* at a time: a byte as it is, or a percent-escape (any case,
//! nested up to three times, `%2541` is `A`), a JSON escape (`\u0041`, `\/`), or an HTML
//! numeric entity (`&#65;`, `&#x41;`), or any mix of these (`\u0025` then `41`). A run of
//! units that spells at least [`MIN_RUN`] consecutive characters of the secret (or all of
//! a shorter one), compared without regard to case, is a match; so is the whole secret
//! written in hex. In text that was cut, a trailing run that spells the secret's start,
//! however short, is one too: what follows the cut could have completed it.

use std::ops::Range;

/// Characters of a secret that may not be shown together: 12 characters of a 32-character
/// key are 60 bits of it.
pub const MIN_RUN: usize = 12;

/// The longest escape ([`unit`]'s `\u0041` or `&#x41;`): a cut text ending in less than
/// this much of an escape may have cut through the secret's next character.
const LONGEST_ESCAPE: usize = 6;

/// One secret, as the matcher compares it.
#[derive(Clone)]
pub struct Pattern {
    /// ASCII-lowercased.
    lower: Vec<u8>,
    /// The secret's bytes in (lower-case) hex.
    hex: Vec<u8>,
    min_run: usize,
    /// Bytes that can be part of a match: the secret's (both cases), escape syntax and
    /// hex digits. A match lies inside a run of these, so shorter runs are skipped fast.
    class: [bool; 256],
}

impl Pattern {
    /// `secret` must be printable ASCII (checked where keys are configured).
    pub fn new(secret: &[u8]) -> Self {
        let lower = secret.to_ascii_lowercase();
        let mut class = [false; 256];
        let syntax = b"%\\&#;uxX0123456789abcdefABCDEF";
        for &b in lower.iter().chain(syntax) {
            class[b as usize] = true;
            class[b.to_ascii_uppercase() as usize] = true;
        }
        Self {
            hex: lower_hex(secret),
            min_run: MIN_RUN.min(lower.len()),
            lower,
            class,
        }
    }

    /// The secret's length in characters.
    pub fn len(&self) -> usize {
        self.lower.len()
    }

    /// How many bytes at the end of `text` could be (the start of) a match: every match
    /// lies inside a run of the bytes this pattern's class holds.
    pub fn trailing_run(&self, text: &[u8]) -> usize {
        text.iter()
            .rev()
            .take_while(|b| self.class[**b as usize])
            .count()
    }

    /// Adds every match in `text` to `found` (unordered, possibly overlapping).
    pub fn find(&self, text: &[u8], cut: bool, found: &mut Vec<Range<usize>>) {
        if self.lower.is_empty() {
            return;
        }
        let mut start = 0;
        while start < text.len() {
            if !self.class[text[start] as usize] {
                start += 1;
                continue;
            }
            let end = text[start..]
                .iter()
                .position(|b| !self.class[*b as usize])
                .map_or(text.len(), |n| start + n);
            if end - start >= self.min_run || (cut && end == text.len()) {
                self.find_in_run(text, start, end, cut, found);
            }
            start = end;
        }
    }

    fn find_in_run(
        &self,
        text: &[u8],
        start: usize,
        end: usize,
        cut: bool,
        found: &mut Vec<Range<usize>>,
    ) {
        let mut at = start;
        while at < end {
            if let Some(stop) = self.hex_at(text, at) {
                found.push(at..stop);
                at = stop;
            } else if let Some(stop) = self.longest_at(text, at, cut) {
                found.push(at..stop);
                at = stop;
            } else {
                at += 1;
            }
        }
    }

    /// The end of the whole secret in hex starting at `at`, any case.
    fn hex_at(&self, text: &[u8], at: usize) -> Option<usize> {
        let stop = at + self.hex.len();
        (stop <= text.len() && text[at..stop].eq_ignore_ascii_case(&self.hex)).then_some(stop)
    }

    /// The end of the longest acceptable run of the secret's characters starting at `at`.
    fn longest_at(&self, text: &[u8], at: usize, cut: bool) -> Option<usize> {
        if cut && reaches_end(text, at) {
            // An escape the cut ended early: it may have been the secret's first character.
            return Some(text.len());
        }
        let (first, next) = unit(text, at)?;
        let mut best: Option<usize> = None;
        for (offset, _) in self.lower.iter().enumerate().filter(|(_, c)| **c == first) {
            let (mut len, mut pos) = (1, next);
            while offset + len < self.lower.len() {
                match unit(text, pos) {
                    Some((c, after)) if c == self.lower[offset + len] => {
                        len += 1;
                        pos = after;
                    }
                    _ => break,
                }
            }
            let cut_short = cut && offset == 0 && reaches_end(text, pos);
            let stop = if cut_short { text.len() } else { pos };
            if (len >= self.min_run || cut_short) && best.is_none_or(|b| stop > b) {
                best = Some(stop);
            }
        }
        best
    }
}

/// Nothing follows `pos` but the start of an escape that the cut ended early.
fn reaches_end(text: &[u8], pos: usize) -> bool {
    let rest = &text[pos..];
    rest.is_empty()
        || (rest.len() < LONGEST_ESCAPE
            && matches!(rest[0], b'%' | b'\\' | b'&')
            && rest.is_ascii())
}

/// One character at `pos` as a reader could decode it (ASCII-lowercased), and where the
/// next one starts.
pub fn unit(text: &[u8], pos: usize) -> Option<(u8, usize)> {
    let (mut value, mut next) = primitive(text, pos)?;
    // `%41`, and a percent sign that is itself encoded (`%2541`, `\u002541`).
    for _ in 0..3 {
        if value != b'%' {
            break;
        }
        let Some((high, after_high)) = primitive(text, next) else {
            break;
        };
        let Some((low, after_low)) = primitive(text, after_high) else {
            break;
        };
        match (hex_digit(high), hex_digit(low)) {
            (Some(h), Some(l)) => {
                value = h << 4 | l;
                next = after_low;
            }
            _ => break,
        }
    }
    Some((value.to_ascii_lowercase(), next))
}

/// A byte, a JSON escape or an HTML numeric entity. Non-ASCII code points come back as
/// 0x80, which no (ASCII) secret contains.
fn primitive(text: &[u8], pos: usize) -> Option<(u8, usize)> {
    let byte = *text.get(pos)?;
    let escaped = match byte {
        b'\\' => json_escape(text, pos),
        b'&' => html_entity(text, pos),
        _ => None,
    };
    Some(escaped.unwrap_or((byte, pos + 1)))
}

fn json_escape(text: &[u8], pos: usize) -> Option<(u8, usize)> {
    match *text.get(pos + 1)? {
        b'u' => {
            let digits = text.get(pos + 2..pos + 6)?;
            let code = digits
                .iter()
                .try_fold(0u32, |acc, d| Some(acc << 4 | u32::from(hex_digit(*d)?)))?;
            Some((ascii_or_marker(code), pos + 6))
        }
        c @ (b'/' | b'\\' | b'"' | b'\'') => Some((c, pos + 2)),
        _ => None,
    }
}

fn html_entity(text: &[u8], pos: usize) -> Option<(u8, usize)> {
    if text.get(pos + 1) != Some(&b'#') {
        return None;
    }
    let hex = matches!(text.get(pos + 2), Some(b'x' | b'X'));
    let first = pos + if hex { 3 } else { 2 };
    let mut code = 0u32;
    let mut at = first;
    while let Some(&d) = text.get(at) {
        let digit = if hex {
            hex_digit(d).map(u32::from)
        } else {
            d.is_ascii_digit().then(|| u32::from(d - b'0'))
        };
        let Some(digit) = digit else { break };
        code = code
            .saturating_mul(if hex { 16 } else { 10 })
            .saturating_add(digit);
        at += 1;
        if at - first > 7 {
            return None;
        }
    }
    (at > first && text.get(at) == Some(&b';')).then(|| (ascii_or_marker(code), at + 1))
}

fn ascii_or_marker(code: u32) -> u8 {
    u8::try_from(code).ok().filter(u8::is_ascii).unwrap_or(0x80)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn lower_hex(bytes: &[u8]) -> Vec<u8> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[(b >> 4) as usize], DIGITS[(b & 15) as usize]])
        .collect()
}

/// `text` with every byte of every range replaced by `*`: the same length.
pub fn mask(text: &[u8], found: &[Range<usize>]) -> Vec<u8> {
    let mut out = text.to_vec();
    for r in found {
        out[r.clone()].fill(b'*');
    }
    out
}

/// `text` with every range replaced by `with` (ranges may overlap and come in any order).
pub fn replace(text: &[u8], mut found: Vec<Range<usize>>, with: &[u8]) -> Vec<u8> {
    found.sort_by_key(|r| r.start);
    let mut out = Vec::with_capacity(text.len());
    let mut copied = 0;
    for r in found {
        if r.end <= copied {
            continue;
        }
        if r.start >= copied {
            out.extend_from_slice(&text[copied..r.start]);
            out.extend_from_slice(with);
        }
        copied = r.end;
    }
    out.extend_from_slice(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(secret: &str, text: &str, cut: bool) -> Vec<String> {
        let mut found = Vec::new();
        Pattern::new(secret.as_bytes()).find(text.as_bytes(), cut, &mut found);
        found.sort_by_key(|r| r.start);
        found.into_iter().map(|r| text[r].to_owned()).collect()
    }

    #[test]
    fn units_decode_every_escape() {
        let decode = |s: &str| {
            let (mut out, mut at) = (Vec::new(), 0);
            while let Some((b, next)) = unit(s.as_bytes(), at) {
                out.push(b);
                at = next;
            }
            out
        };
        assert_eq!(decode("Ab%43%6a"), b"abcj");
        assert_eq!(decode(r"\u0041\/\u00e9"), [b'a', b'/', 0x80]);
        assert_eq!(decode("%2541%252f"), b"a/");
        assert_eq!(decode(r"\u002541"), b"a");
        assert_eq!(decode("&#65;&#x42;&#X63;"), b"abc");
        assert_eq!(decode("%zz&#;&x"), b"%zz&#;&x");
    }

    #[test]
    fn finds_the_whole_secret_in_any_encoding() {
        let s = "Sk/9+key=Zz-_.";
        for text in [
            "a Sk/9+key=Zz-_. b",
            "a sk/9+KEY=zz-_. b",
            "a Sk%2F9%2Bkey%3DZz-_. b",
            "a Sk%2f9%2bkey%3dZz-_. b",
            "a %53%6b%2f%39%2b%6b%65%79%3d%5a%7a%2d%5f%2e b",
            r"a \u0053k\/9\u002Bkey\u003dZz-_. b",
            "a Sk%252F9+key=Zz-_. b",
            "a &#83;k&#x2f;9+key=Zz-_. b",
            "a 536b2f392b6b65793d5a7a2d5f2e b",
            "a 536B2F392B6B65793D5A7A2D5F2E b",
        ] {
            let found = matches(s, text, false);
            assert_eq!(found.len(), 1, "{text}: {found:?}");
            assert!(
                text.contains(&found[0]) && found[0].len() >= s.len(),
                "{text}"
            );
        }
    }

    #[test]
    fn finds_long_pieces_and_cut_starts() {
        let s = "abcdefghijklmnopqrstuvwxyz";
        assert_eq!(matches(s, "x defghijklmno y", false), ["defghijklmno"]);
        assert!(
            matches(s, "x defghijklmn y", false).is_empty(),
            "11 is fewer than 12"
        );
        assert!(matches(s, "tail abcde", false).is_empty(), "not cut");
        assert_eq!(matches(s, "tail abcde", true), ["abcde"]);
        assert_eq!(
            matches(s, "tail abc%6", true),
            ["abc%6"],
            "cut inside an escape"
        );
        assert!(matches(s, "tail bcde", true).is_empty(), "not the start");
        // A short secret is matched only whole.
        assert_eq!(matches("k3y", "a k3y b k3 c", false), ["k3y"]);
    }

    #[test]
    fn replaces_overlapping_ranges_once() {
        let out = replace(b"0123456789", vec![5..8, 1..3, 2..4, 6..7], b"*");
        assert_eq!(out, b"0*4*89");
    }
}
