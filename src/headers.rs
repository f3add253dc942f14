//! Looking for headers, and taking them out, on the request path. Most of the names the
//! proxy reads or strips (its own headers, hop-by-hop ones) are absent from any one
//! message, and `HeaderMap::get` and `remove` hash the name even then; a look along the
//! handful of names a message carries is cheaper (a name compares by its standard index
//! or its length first), and only the names found are removed.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Past this many values a message's map is searched by hash, as usual.
const LOOK_ALONG: usize = 16;

/// The first value of `name`, as `HeaderMap::get` gives it.
pub fn get<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if headers.len() > LOOK_ALONG {
        return headers.get(name);
    }
    headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// Whether `headers` holds `name`.
pub fn contains(headers: &HeaderMap, name: &HeaderName) -> bool {
    if headers.len() > LOOK_ALONG {
        return headers.contains_key(name);
    }
    headers.keys().any(|k| k == name)
}

/// Removes every value of each of `names` that `headers` holds.
pub fn remove_all(headers: &mut HeaderMap, names: &[HeaderName]) {
    for name in names {
        if contains(headers, name) {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, header};

    #[test]
    fn get_and_contains_agree_with_the_map_at_any_size() {
        for n in [0, 1, 5, LOOK_ALONG, LOOK_ALONG + 1, 40] {
            let mut h = HeaderMap::new();
            for i in 0..n {
                h.append(
                    HeaderName::try_from(format!("x-h{i}")).unwrap(),
                    HeaderValue::from(i),
                );
            }
            h.append("x-h0", HeaderValue::from_static("second"));
            for name in ["x-h0", "x-h3", "x-absent"] {
                let name = HeaderName::from_static(name);
                assert_eq!(get(&h, &name), h.get(&name), "{n} {name}");
                assert_eq!(contains(&h, &name), h.contains_key(&name), "{n} {name}");
            }
            assert_eq!(get(&h, &header::HOST), None);
        }
    }

    #[test]
    fn removes_every_value_of_the_names_present_and_nothing_else() {
        let mut h = HeaderMap::new();
        h.append(header::HOST, HeaderValue::from_static("a"));
        h.append("x-mine", HeaderValue::from_static("1"));
        h.append("x-mine", HeaderValue::from_static("2"));
        h.append("x-kept", HeaderValue::from_static("3"));
        remove_all(
            &mut h,
            &[header::HOST, HeaderName::from_static("x-mine"), header::TE],
        );
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "3");
    }
}
