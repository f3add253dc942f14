//! How configuration errors show what the user wrote. A key pasted into the wrong setting
//! (a SmartLead URL with `?api_key=` as `upstream.base_url`, the key as `limit.max_wait`)
//! must not come back in the error line, at start or on reload, so no error quotes a
//! value whole: a value is shown only when it is shorter than [`MIN_RUN`] (fewer
//! characters than the key matcher counts as a key), a URL only with its credentials and
//! query values masked, and the `config` crate's own errors are rewritten without the
//! strings they quote and without the source lines of a TOML syntax error. Whatever
//! secrets are known (`Secrets`) are scrubbed from the line after that, as a second
//! guard.

use crate::key::MIN_RUN;

/// A value the user set, as an error may show it.
pub fn quoted(value: &str) -> String {
    let chars = value.chars().count();
    if chars < MIN_RUN && !value.chars().any(char::is_control) {
        format!("{value:?}")
    } else {
        format!("a value of {chars} characters")
    }
}

/// A route the user set (a `cache.ttl` pattern), as an error may show it: every
/// segment long enough to be a pasted key as `…`.
pub fn route(value: &str) -> String {
    if value.chars().any(char::is_control) {
        return quoted(value);
    }
    let masked: Vec<&str> = value
        .split('/')
        .map(|seg| {
            if seg.chars().count() >= MIN_RUN {
                "…"
            } else {
                seg
            }
        })
        .collect();
    format!("{:?}", masked.join("/"))
}

/// A URL as an error may show it: userinfo and query values masked; text that is not a
/// URL at all only as [`quoted`] shows it.
pub fn url(value: &str) -> String {
    if !value.contains("://") {
        return quoted(value);
    }
    format!("{:?}", mask_long_parts(&mask_query(&mask_userinfo(value))))
}

/// Every part between a URL's delimiters that is [`MIN_RUN`] characters or longer as
/// `…`: a host or path segment can be a pasted key as well as a query value can.
fn mask_long_parts(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    for part in url.split_inclusive(['/', '.', ':', '@', '?', '#', '&', '=']) {
        let (text, delimiter) = match part.char_indices().last() {
            Some((i, c)) if "/.:@?#&=".contains(c) => (&part[..i], &part[i..]),
            _ => (part, ""),
        };
        out.push_str(if text.chars().count() >= MIN_RUN {
            "…"
        } else {
            text
        });
        out.push_str(delimiter);
    }
    out
}

/// A file path as an error may show it: as written when it has a directory in it (a key
/// has none), else only as [`quoted`] shows it.
pub fn path(path: &std::path::Path) -> String {
    let text = path.to_string_lossy();
    if text.contains('/') {
        format!("{:?}", text)
    } else {
        quoted(&text)
    }
}

/// `scheme://user:password@host/...` as `scheme://***@host/...` (any text works: it need
/// not parse).
pub fn mask_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..scheme_end], &rest[at..]),
        None => url.to_owned(),
    }
}

/// `?a=1&api_key=k#f` as `?a=***&api_key=***#f`.
fn mask_query(url: &str) -> String {
    let Some(q) = url.find('?') else {
        return url.to_owned();
    };
    let (head, rest) = url.split_at(q + 1);
    let (query, fragment) = rest.split_at(rest.find('#').unwrap_or(rest.len()));
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, v)) if !v.is_empty() => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    // A fragment is not sent anywhere, but it is still the user's text.
    let fragment = if fragment.len() > 1 { "#***" } else { fragment };
    format!("{head}{}{fragment}", pairs.join("&"))
}

/// One line for an error of the `config` crate, quoting no string value.
pub fn load_error(e: &config::ConfigError) -> String {
    use config::ConfigError as E;
    match e {
        E::Type {
            unexpected,
            expected,
            key,
            ..
        } => {
            let found = unexpected.to_string();
            let found = if found.starts_with("string ") {
                "a string".to_owned()
            } else {
                found
            };
            at(
                key.as_deref(),
                &format!("expected {expected}, found {found}"),
            )
        }
        E::At { error, key, .. } => at(key.as_deref(), &load_error(error)),
        E::Message(m) => without_strings(m),
        E::FileParse { uri, cause } => {
            let what = uri.as_deref().unwrap_or("the configuration");
            format!("{what}: {}", syntax_error(&cause.to_string()))
        }
        E::NotFound(key) => format!("{key} is missing"),
        other => without_strings(
            &other
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        ),
    }
}

/// `key: message`, unless the message already starts with the key.
fn at(key: Option<&str>, message: &str) -> String {
    match key {
        Some(k) if !message.starts_with(k) => format!("{k}: {message}"),
        _ => message.to_owned(),
    }
}

/// A TOML syntax error's position and message, without the source lines it quotes.
pub fn syntax_error(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("not valid TOML");
    // The quoted source lines start with a line number or a `|`; the message is last.
    let message =
        lines.rfind(|l| !l.starts_with('|') && !l.starts_with(|c: char| c.is_ascii_digit()));
    match message {
        Some(m) => without_strings(&format!("{first}: {m}")),
        None => without_strings(first),
    }
}

/// serde's `string "..."` (the value it could not use) as `a string`.
pub fn without_strings(message: &str) -> String {
    const OPEN: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(OPEN) {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        let quoted = &rest[at + OPEN.len()..];
        let mut end = quoted.len();
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &quoted[end.min(quoted.len())..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_shown_only_short_and_urls_masked() {
        assert_eq!(quoted("10/2days"), "\"10/2days\"");
        assert_eq!(quoted("0123456789abcdef"), "a value of 16 characters");
        assert_eq!(
            url("https://u:p@server.smartlead.ai/api/v1?api_key=SECRETSECRET&x=1#frag"),
            "\"https://***@server.smartlead.ai/api/v1?api_key=***&x=***#***\""
        );
        assert_eq!(url("SECRETSECRETSECRET"), "a value of 18 characters");
        assert_eq!(
            url("ftp://SECRETSECRETSECRET/api/v1/SECRETSECRETSECRET"),
            "\"ftp://…/api/v1/…\""
        );
    }

    #[test]
    fn serde_strings_and_toml_source_lines_are_dropped() {
        assert_eq!(
            without_strings(r#"invalid value: string "SE\"CRET", expected a duration"#),
            "invalid value: a string, expected a duration"
        );
        let toml = "TOML parse error at line 2, column 11\n  |\n2 | api_key = SECRETSECRET\n  |           ^\nstring values must be quoted, expected literal string\n";
        let shown = syntax_error(toml);
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(
            shown.contains("line 2, column 11") && shown.contains("must be quoted"),
            "{shown}"
        );
    }
}
