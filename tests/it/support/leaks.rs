//! Looking for a key the way a reader who wants it would: decoding what it sees
//! (percent-escapes in any case and nested, JSON `\u`/`\/` escapes, HTML numeric
//! entities) and searching the result, in any letter case, for the key or any run of 12
//! of its characters, and the raw text for the key in hex. Written independently of the
//! proxy's own scrubber, which it checks.

/// Characters of a key that may not be shown together (the proxy's `key::MIN_RUN`).
const RUN: usize = 12;

/// How `key` shows in `text`, or `None` when it does not.
pub fn key_form_in(text: &str, key: &str) -> Option<String> {
    let key_lower = key.to_ascii_lowercase();
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    if text.to_ascii_lowercase().contains(&hex) {
        return Some("hex".into());
    }
    let run = RUN.min(key.len());
    let pieces: Vec<&str> = (0..=key_lower.len() - run)
        .map(|i| &key_lower[i..i + run])
        .collect();
    let mut view = text.to_owned();
    for round in 0..4 {
        let lower = view.to_ascii_lowercase();
        if let Some(piece) = pieces.iter().find(|p| lower.contains(**p)) {
            let at = lower.find(piece).unwrap_or(0);
            let context: String = view[at.saturating_sub(20)..].chars().take(60).collect();
            return Some(format!(
                "{piece:?} after {round} rounds of decoding, in ...{context}..."
            ));
        }
        let next = decode_once(&view);
        if next == view {
            break;
        }
        view = next;
    }
    None
}

/// Panics if `key` shows in `text` in any form; `what` says where the text came from.
pub fn assert_no_key(text: &str, key: &str, what: &str) {
    if let Some(form) = key_form_in(text, key) {
        panic!("the key shows in {what}: {form}");
    }
}

/// One round of every decoding a reader could apply.
fn decode_once(text: &str) -> String {
    let percent = percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned();
    html_entities(&json_escapes(&percent))
}

fn json_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let unicode = rest
            .strip_prefix("\\u")
            .and_then(|r| r.get(..4))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32);
        if let Some(c) = unicode {
            out.push(c);
            rest = &rest[6..];
        } else if let Some(c) = rest[1..].chars().next().filter(|c| "/\\\"'".contains(*c)) {
            out.push(c);
            rest = &rest[2..];
        } else {
            out.push('\\');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

fn html_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("&#") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let decoded = rest.find(';').and_then(|end| {
            let digits = &rest[2..end];
            let code = match digits.strip_prefix(['x', 'X']) {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None => digits.parse().ok(),
            }?;
            Some((char::from_u32(code)?, end + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push_str("&#");
                rest = &rest[2..];
            }
        }
    }
    out.push_str(rest);
    out
}
