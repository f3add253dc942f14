//! The documentation holds: every relative link and `#anchor` in every Markdown file of
//! the repository resolves, no document points outside the repository, and
//! docs/configuration.md names exactly the keys `check-config` prints, and docs/errors.md
//! every envelope code.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::support::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every Markdown file of the project: not Cargo's output, not hyper's own docs.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                let skipped = name.starts_with('.') || name == "target" || name == "hyper";
                if !skipped {
                    walk(&path, out);
                }
            } else if name.ends_with(".md") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root(), &mut out);
    out.sort();
    out
}

/// The text outside fenced code blocks and inline code spans.
fn prose(markdown: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.extend(line.split('`').step_by(2));
            out.push('\n');
        }
    }
    out
}

/// Link targets: `[text](target)`, `![alt](target)` and `[name]: target`.
fn links(markdown: &str) -> Vec<String> {
    let text = prose(markdown);
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let end = rest.find(')').unwrap_or(rest.len());
        let target = rest[..end].split_whitespace().next().unwrap_or("");
        out.push(target.trim_matches(['<', '>']).to_owned());
    }
    for line in text.lines() {
        if let Some((label, target)) = line.trim_start().split_once("]: ")
            && label.starts_with('[')
            && !label.contains(']')
        {
            out.push(target.trim().to_owned());
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped,
/// spaces as `-`.
fn slug(heading: &str) -> String {
    let mut text = heading.replace('`', "");
    // A link in a heading anchors on its text.
    while let (Some(open), Some(mid)) = (text.find('['), text.find("](")) {
        let Some(close) = text[mid..].find(')').map(|c| mid + c) else {
            break;
        };
        text = format!(
            "{}{}{}",
            &text[..open],
            &text[open + 1..mid],
            &text[close + 1..]
        );
    }
    text.to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a file's headings make, duplicates numbered as GitHub numbers them.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let heading = line.trim_start_matches('#');
        if fenced || heading.len() == line.len() || !heading.starts_with(' ') {
            continue;
        }
        let base = slug(heading.trim());
        let n = seen.entry(base.clone()).or_default();
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// Why `target`, linked from `file`, does not resolve, if it does not.
fn broken(file: &Path, target: &str) -> Option<String> {
    if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
        return None;
    }
    let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
    let linked = if path.is_empty() {
        file.to_path_buf()
    } else {
        file.parent().unwrap().join(path)
    };
    let Ok(linked) = linked.canonicalize() else {
        return Some("no such file".into());
    };
    if !linked.starts_with(root().canonicalize().unwrap()) {
        return Some("outside the repository".into());
    }
    if anchor.is_empty() {
        return None;
    }
    if linked.extension().is_none_or(|e| e != "md") {
        return Some("an anchor into a file that is not Markdown".into());
    }
    let found = anchors(&std::fs::read_to_string(&linked).unwrap());
    (!found.contains(anchor)).then(|| format!("no heading makes #{anchor}"))
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let files = markdown_files();
    assert!(files.len() > 10, "found only {files:?}");
    let mut broken_links = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for target in links(&text) {
            checked += 1;
            if let Some(why) = broken(file, &target) {
                let shown = file.strip_prefix(root()).unwrap().display();
                broken_links.push(format!("{shown}: ({target}): {why}"));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: the parser is broken"
    );
    assert!(broken_links.is_empty(), "{}", broken_links.join("\n"));
}

#[test]
fn the_link_checker_finds_what_is_broken() {
    let readme = root().join("README.md");
    assert_eq!(broken(&readme, "docs/configuration.md#configuration"), None);
    assert_eq!(broken(&readme, "https://example.com/x#y"), None);
    assert!(broken(&readme, "docs/nothing.md").is_some());
    assert!(broken(&readme, "docs/configuration.md#no-such-heading").is_some());
    assert!(broken(&readme, "../outside.md").is_some());
    assert_eq!(
        slug("The fleet (`limit.backend = \"redis\"`)"),
        "the-fleet-limitbackend--redis"
    );
    assert_eq!(
        slug("Keys (all in the account's hash slot)"),
        "keys-all-in-the-accounts-hash-slot"
    );
    let text = "# A\n```\n# not a heading\n```\n## A\n[x](#a-1) `[y](#z)`\n";
    assert_eq!(anchors(text), BTreeSet::from(["a".into(), "a-1".into()]));
    assert_eq!(links(text), ["#a-1"]);
}

#[test]
fn no_document_points_outside_the_repository_or_to_issue_numbers() {
    let mut found = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let shown = file.strip_prefix(root()).unwrap().display().to_string();
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            let issue = lower.match_indices("issue").any(|(at, _)| {
                let after = lower[at + 5..].trim_start_matches([' ', '-', '#']);
                after.starts_with(|c: char| c.is_ascii_digit())
            });
            if issue || line.contains("DESIGN.md") || line.contains("../shared") {
                found.push(format!("{shown}:{}: {line}", n + 1));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn every_envelope_code_is_in_the_errors_page() {
    let page = std::fs::read_to_string(root().join("docs/errors.md")).unwrap();
    let missing: Vec<_> = smartlead_proxy::error::Code::ALL
        .iter()
        .map(|c| c.as_str())
        .filter(|c| !page.contains(c))
        .collect();
    assert!(missing.is_empty(), "not in docs/errors.md: {missing:?}");
}

/// The keys docs/configuration.md's table names in its first column.
fn documented_keys() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let mut keys = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let first = line.split('|').nth(1).unwrap();
        for (i, piece) in first.split('`').enumerate() {
            let is_key = !piece.is_empty()
                && piece
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.');
            if i % 2 == 1 && is_key {
                keys.insert(piece.to_owned());
            }
        }
    }
    keys
}

/// Every key `check-config` prints: `section.key`, a top-level value by its name, and
/// a table's keys under the table's name (`accounts.name`).
fn printed_keys(toml_text: &str) -> BTreeSet<String> {
    let table: toml::Table = toml_text.parse().expect("check-config prints TOML");
    let mut keys = BTreeSet::new();
    for (name, value) in &table {
        match value {
            toml::Value::Table(section) => {
                keys.extend(section.keys().map(|k| format!("{name}.{k}")));
            }
            toml::Value::Array(items) => {
                keys.insert(name.clone());
                for item in items.iter().filter_map(toml::Value::as_table) {
                    keys.extend(item.keys().map(|k| format!("{name}.{k}")));
                }
            }
            _ => {
                keys.insert(name.clone());
            }
        }
    }
    keys
}

#[test]
fn the_configuration_page_and_check_config_name_the_same_keys() {
    // Every optional key set, so that check-config prints it.
    let ca = TestCa::new();
    let ca = ca.ca.display();
    let file = temp_file(
        "every-key.toml",
        &format!(
            r#"
[[accounts]]
name = "acme"
key_env = "ACME_KEY"
windows = ["5/1s"]
tokens = ["worker:secret-token"]

[upstream]
ca_file = "{ca}"
proxy = "http://proxy.invalid:3128"

[limit]
per_client = "30/60s"
client_weights = {{ a = 2 }}

[redis]
ca_file = "{ca}"

[cache]
ttl = {{ "/campaigns" = "5m" }}
"#
        ),
    );
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config", &file.display().to_string()])
        .env("SMARTLEAD_API_KEY", "check-config-key")
        .env("ACME_KEY", "acme-account-key")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml_text: String = stdout
        .lines()
        .filter(|l| !l.starts_with("smartlead-proxy:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let printed = printed_keys(&toml_text);
    let documented = documented_keys();
    let undocumented: Vec<_> = printed.difference(&documented).collect();
    let unprinted: Vec<_> = documented.difference(&printed).collect();
    assert!(
        undocumented.is_empty() && unprinted.is_empty(),
        "printed by check-config but not in docs/configuration.md: {undocumented:?}\n\
         in docs/configuration.md but not printed by check-config: {unprinted:?}"
    );
    assert!(printed.len() > 60, "{printed:?}");
}
