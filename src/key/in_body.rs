//! A client's `api_key` in a request body. SmartLead reads the key from a top-level
//! `api_key` member of a JSON object body and from an `api_key` field of a form body as
//! well as from the query, so the proxy treats those exactly like the query parameter:
//! they are taken out, and the rest of the body goes on byte for byte (its length is set
//! again by the upstream client from the new body).
//!
//! JSON: the body is an object when its first non-blank byte is `{` and it parses; each
//! top-level member named `api_key` (any case, escapes decoded) is cut out with the
//! separator before or after it, every other byte stays. The last one is the key, as
//! JSON parsers keep the last of repeated names. Form (`application/x-www-form-urlencoded`):
//! every field whose name parsers read as `api_key` ([`is_api_key_name`]) is dropped;
//! the first is the key. A compressed body (`Content-Encoding`) is passed on as it is.

use bytes::Bytes;
use http::{HeaderMap, header};
use percent_encoding::percent_decode_str;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::is_api_key_name;

/// A body with its `api_key` taken out.
#[derive(Debug, PartialEq)]
pub struct Taken {
    pub body: Bytes,
    /// The key the client sent, when it was a non-empty string.
    pub key: Option<String>,
}

/// The body without its `api_key`, or `None` when it has none (send it as it is).
pub fn take_api_key(headers: &HeaderMap, body: &Bytes) -> Option<Taken> {
    if body.is_empty() || headers.contains_key(header::CONTENT_ENCODING) {
        return None;
    }
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if form {
        return take_from_form(body);
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') && maybe_named(body) {
        return take_from_json(body);
    }
    None
}

/// Whether the bytes could hold a member named `api_key`: `key` in any case, or an
/// escape that could spell it. Most bodies are ruled out without parsing.
fn maybe_named(body: &[u8]) -> bool {
    body.contains(&b'\\') || body.windows(3).any(|w| w.eq_ignore_ascii_case(b"key"))
}

fn take_from_form(body: &Bytes) -> Option<Taken> {
    let text = std::str::from_utf8(body).ok()?;
    let mut key = None;
    let mut kept = Vec::new();
    let mut found = false;
    for field in text.split('&') {
        let (name, value) = field.split_once('=').unwrap_or((field, ""));
        if !is_api_key_name(name) {
            kept.push(field);
            continue;
        }
        found = true;
        if key.is_none() && !value.is_empty() {
            let value = value.replace('+', " ");
            key = Some(percent_decode_str(&value).decode_utf8_lossy().into_owned());
        }
    }
    found.then(|| Taken {
        body: Bytes::from(kept.join("&")),
        key,
    })
}

/// One top-level member: its name (decoded) and where its value lies in the body.
struct Member {
    name: String,
    value: std::ops::Range<usize>,
}

fn take_from_json(body: &Bytes) -> Option<Taken> {
    let text = std::str::from_utf8(body).ok()?;
    let members = members(text)?;
    let named = |m: &Member| m.name.eq_ignore_ascii_case("api_key");
    if !members.iter().any(named) {
        return None;
    }
    let key = members
        .iter()
        .rfind(|m| named(m))
        .and_then(|m| serde_json::from_str::<String>(&text[m.value.clone()]).ok())
        .filter(|k| !k.is_empty());
    Some(Taken {
        body: Bytes::from(without(text, &members, named)),
        key,
    })
}

/// The object's members in order, repeated names included.
fn members(text: &str) -> Option<Vec<Member>> {
    struct Members<'a>(&'a str);
    impl<'de> Visitor<'de> for Members<'de> {
        type Value = Vec<Member>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<Member>, A::Error> {
            let base = self.0.as_ptr() as usize;
            let mut out = Vec::new();
            while let Some((name, value)) = map.next_entry::<String, &'de RawValue>()? {
                // The value borrows from the body: its offset is where it lies in it.
                let start = value.get().as_ptr() as usize - base;
                out.push(Member {
                    name,
                    value: start..start + value.get().len(),
                });
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let members = de.deserialize_map(Members(text)).ok()?;
    de.end().ok()?;
    Some(members)
}

/// `text` without the members `drop` picks. Each kept member keeps its bytes, and the
/// separator that followed it in the body when another kept member follows.
fn without(text: &str, members: &[Member], drop: impl Fn(&Member) -> bool) -> String {
    let open = text.find('{').expect("an object");
    // Where each member's name starts: past the `{` or the `,` before it, and blanks.
    let starts: Vec<usize> = members
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let after = if i == 0 {
                open + 1
            } else {
                members[i - 1].value.end
            };
            let rest = &text[after..];
            let skipped = rest
                .find(|c: char| !c.is_ascii_whitespace() && c != ',')
                .unwrap_or(rest.len());
            after + skipped
        })
        .collect();
    let last_end = members.last().map_or(open + 1, |m| m.value.end);
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..starts.first().copied().unwrap_or(open + 1)]);
    let kept: Vec<usize> = (0..members.len()).filter(|&i| !drop(&members[i])).collect();
    for (n, &i) in kept.iter().enumerate() {
        if n > 0 {
            // The separator that followed the previous kept member.
            let prev = kept[n - 1];
            out.push_str(&text[members[prev].value.end..starts[prev + 1]]);
        }
        out.push_str(&text[starts[i]..members[i].value.end]);
    }
    out.push_str(&text[last_end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn json(body: &str) -> Option<(String, Option<String>)> {
        let taken = take_api_key(&HeaderMap::new(), &Bytes::from(body.to_owned()))?;
        Some((String::from_utf8(taken.body.to_vec()).unwrap(), taken.key))
    }

    fn form(body: &str) -> Option<(String, Option<String>)> {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        let taken = take_api_key(&h, &Bytes::from(body.to_owned()))?;
        Some((String::from_utf8(taken.body.to_vec()).unwrap(), taken.key))
    }

    #[test]
    fn a_json_member_is_cut_and_every_other_byte_kept() {
        let k = |s: &str| Some(s.to_owned());
        for (body, rest, key) in [
            (r#"{"api_key":"theirs"}"#, "{}", k("theirs")),
            (r#"{"a":1,"api_key":"theirs"}"#, r#"{"a":1}"#, k("theirs")),
            (r#"{"api_key":"theirs","a":1}"#, r#"{"a":1}"#, k("theirs")),
            (
                "{ \"a\" : [1, {\"api_key\": \"nested\"}] ,\n  \"API_KEY\" : \"x\",\n  \"b\":\"c\"  }",
                "{ \"a\" : [1, {\"api_key\": \"nested\"}] ,\n  \"b\":\"c\"  }",
                k("x"),
            ),
            (
                r#"{"api\u005fkey":"esc","lead_list":[]}"#,
                r#"{"lead_list":[]}"#,
                k("esc"),
            ),
            (
                r#"{"api_key":"first","a":{"b":2},"api_key":"last"}"#,
                r#"{"a":{"b":2}}"#,
                k("last"),
            ),
            (r#"{"a":1,"api_key":42,"b":2}"#, r#"{"a":1,"b":2}"#, None),
            (r#"  {"api_key":"k","a":"x"}  "#, r#"  {"a":"x"}  "#, k("k")),
        ] {
            let (got, got_key) = json(body).unwrap_or_else(|| panic!("{body}"));
            assert_eq!(got, rest, "{body}");
            assert_eq!(got_key, key, "{body}");
            serde_json::from_str::<serde_json::Value>(&got).expect("still JSON");
        }
        for untouched in [
            r#"{"a":"api_key"}"#,
            r#"{"a":{"api_key":"nested"}}"#,
            r#"[{"api_key":"k"}]"#,
            r#"{"api_key":"k""#,
            "not json api_key=1",
        ] {
            assert_eq!(json(untouched), None, "{untouched}");
        }
    }

    #[test]
    fn a_form_field_is_dropped_in_every_name_form() {
        assert_eq!(
            form("a=1&api_key=theirs&b=2"),
            Some(("a=1&b=2".into(), Some("theirs".into())))
        );
        assert_eq!(
            form("api_key%5B%5D=t%2Bk&API_KEY[0]=x&c=3"),
            Some(("c=3".into(), Some("t+k".into())))
        );
        assert_eq!(form("a=1&b=2"), None);
        // A form body is not read as JSON, nor JSON as a form.
        assert_eq!(form(r#"{"api_key":"k"}"#), None);
        assert_eq!(json("api_key=k"), None);
    }

    #[test]
    fn a_compressed_body_is_passed_on() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(
            take_api_key(&h, &Bytes::from_static(br#"{"api_key":"k"}"#)),
            None
        );
    }
}
