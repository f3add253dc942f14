//! Taking headers out of a message on the request path. Most of the names the proxy strips
//! (its own headers, hop-by-hop ones) are absent from any one message, and
//! `HeaderMap::remove` hashes the name even then; a look along the handful of names a
//! message carries is cheaper, and only the names found are removed.

use http::{HeaderMap, HeaderName};

/// Removes every value of each of `names` that `headers` holds.
pub fn remove_all(headers: &mut HeaderMap, names: &[HeaderName]) {
    for name in names {
        if headers.keys().any(|k| k == name) {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, header};

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
