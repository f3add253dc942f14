use std::time::Duration;

use secrecy::SecretString;

use super::*;

fn load(vars: &[(&str, &str)], file: Option<&str>) -> Result<Settings, ConfigError> {
    let mut env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.entry(API_KEY_VAR.into())
        .or_insert_with(|| "key".into());
    let path = file.map(|text| {
        let path = std::env::temp_dir().join(format!("slp-config-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, text).unwrap();
        path
    });
    Settings::load_from(Path::new("/nonexistent"), path.as_deref(), &env)
}

fn labels(s: &Settings) -> Vec<&str> {
    s.limit.windows.iter().map(Window::label).collect()
}

#[test]
fn cache_routes_come_as_a_table_or_as_text() {
    let file = "[cache]\nttl = { \"/campaigns\" = \"5m\", \"/campaigns/*/analytics\" = \"1m\" }\n";
    let from_file = load(&[], Some(file)).unwrap().cache.ttl;
    let env = [(
        "SMARTLEAD_PROXY__CACHE__TTL",
        "/campaigns=5m, /campaigns/*/analytics=1m",
    )];
    assert_eq!(load(&env, None).unwrap().cache.ttl, from_file);
    assert_eq!(from_file["/campaigns"], Duration::from_secs(300));
    for (bad, says) in [
        ("/campaigns=soon", "is not a duration"),
        ("campaigns=5m", "must start with '/'"),
        ("/a/**/b=5m", "'**' may only be the last segment"),
        ("/campaigns=0s", "between 1ms and 1d"),
        ("/campaigns", "is not route=duration"),
    ] {
        let err = load(&[("SMARTLEAD_PROXY__CACHE__TTL", bad)], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cache.ttl") && err.contains(says),
            "{bad}: {err}"
        );
    }
    let err = load(&[("SMARTLEAD_PROXY__CACHE__MAX_BYTES", "10")], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache.max_bytes"), "{err}");
}

#[test]
fn the_quota_has_two_forms_never_both() {
    assert_eq!(labels(&load(&[], None).unwrap()), DEFAULT_WINDOWS);
    let pro = [("SMARTLEAD_PROXY__LIMIT__WINDOWS", "20/1s,120/60s,3000/1h")];
    assert_eq!(
        labels(&load(&pro, None).unwrap()),
        ["20/1s", "120/60s", "3000/1h"]
    );
    let older = load(&[("SMARTLEAD_PROXY__LIMIT__REQUESTS", "5")], None).unwrap();
    assert_eq!(
        older.limit.windows,
        [Window::new(5, Duration::from_secs(60))]
    );
    let older = load(&[], Some("[limit]\nperiod = \"10s\"\n")).unwrap();
    assert_eq!(
        older.limit.windows,
        [Window::new(60, Duration::from_secs(10))]
    );
    let both = load(&pro, Some("[limit]\nrequests = 5\n"))
        .unwrap_err()
        .to_string();
    assert!(
        both.contains("limit.windows") && both.contains("limit.requests"),
        "{both}"
    );
    for bad in ["ten/1s", "10", "0/1s", "10/2days", "10/0s"] {
        let err = load(&[("SMARTLEAD_PROXY__LIMIT__WINDOWS", bad)], None).unwrap_err();
        assert!(err.to_string().contains("limit.windows"), "{bad}: {err}");
    }
}

#[test]
fn accounts_take_their_keys_from_the_environment_only() {
    let file = "[[accounts]]\nname = \"acme\"\nkey_env = \"KEY_ACME\"\nwindows = [\"5/1s\"]\ntokens = [\"t-acme\"]\n";
    let s = load(&[("KEY_ACME", "acme-key-123")], Some(file)).unwrap();
    assert_eq!(s.accounts[0].windows.as_ref().unwrap()[0].label(), "5/1s");
    assert!(s.accounts[0].key.is_some());
    assert!(
        !format!("{s:?}").contains("acme-key-123"),
        "Debug redacts the key"
    );
    let missing = load(&[], Some(file)).unwrap_err().to_string();
    assert!(
        missing.contains("accounts[acme].key_env") && missing.contains("KEY_ACME"),
        "{missing}"
    );
    let named = |name: &str| format!("[[accounts]]\nname = \"{name}\"\nkey_env = \"K\"\n");
    for bad in ["Acme", "default", "a b", ""] {
        let err = load(&[("K", "some-key-1")], Some(&named(bad)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("accounts[0].name"), "{bad}: {err}");
    }
    let twice = format!("{}{}", named("x"), named("x"));
    assert!(load(&[("K", "some-key-1")], Some(&twice)).is_err());
    // With accounts, SMARTLEAD_API_KEY may be left out: there is then no default.
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("KEY_ACME".into(), "acme-key-123".into());
    let path = std::env::temp_dir().join(format!("slp-config-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, file).unwrap();
    assert!(Settings::load_from(Path::new("/nonexistent"), Some(&path), &env).is_ok());
}

#[test]
fn restart_only_settings_keep_their_running_values() {
    let running = Settings::default();
    let mut next = Settings::default();
    next.server.listen = "127.0.0.1:9999".parse().unwrap();
    next.redis.url = SecretString::from("redis://elsewhere:6379");
    next.limit.max_wait = Duration::from_secs(5);
    let kept = next.keep_restart_only(&running);
    assert_eq!(kept, vec!["server.listen", "redis.url"]);
    assert_eq!(next.server.listen, running.server.listen);
    assert_eq!(
        next.redis.url.expose_secret(),
        running.redis.url.expose_secret()
    );
    assert_eq!(next.limit.max_wait, Duration::from_secs(5), "applied");
}

#[test]
fn fairness_settings_are_checked() {
    let s = load(&[], None).unwrap();
    assert_eq!(s.limit.per_client, None);
    assert_eq!(s.limit.max_queue_per_client, s.limit.max_queue);
    assert!(s.limit.allow_priority);
    let file = "[limit]\nper_client = \"30/60s\"\nmax_queue = 50\nclient_weights = { UI = 4, \"batch.eu-1\" = 2 }\n";
    let s = load(&[], Some(file)).unwrap();
    let cap = s.limit.per_client.unwrap();
    assert_eq!((cap.requests, cap.period), (30, Duration::from_secs(60)));
    assert_eq!(s.limit.max_queue_per_client, 50, "follows max_queue");
    assert_eq!(
        s.limit.client_weights.get("UI"),
        Some(&4),
        "{:?}",
        s.limit.client_weights
    );
    assert_eq!(
        s.limit.client_weights.get("batch.eu-1"),
        Some(&2),
        "{:?}",
        s.limit.client_weights
    );
    let env = [("SMARTLEAD_PROXY__LIMIT__PER_CLIENT", "5/1s")];
    assert_eq!(
        load(&env, None).unwrap().limit.per_client.unwrap().requests,
        5
    );
    for bad in [
        "per_client = \"thirty\"",
        "client_weights = { ui = 0 }",
        "client_weights = { ui = 1001 }",
        "client_weights = { \"a b\" = 2 }",
        "max_queue_per_client = 0",
    ] {
        let err = load(&[], Some(&format!("[limit]\n{bad}\n")))
            .unwrap_err()
            .to_string();
        let key = bad.split(' ').next().unwrap();
        assert!(err.contains(&format!("limit.{key}")), "{bad}: {err}");
    }
}

/// A key as SmartLead issues them, planted where it does not belong.
const PLANTED: &str = "0f3c9a7d-2b8e-4c61-a5f0-9e3d7b2c8a41_k2x9q7";

/// Environment variables and a config file's text.
type Planting = (Vec<(String, String)>, Option<String>);

/// Every way of putting `PLANTED` into setting `section.key`: as text, in a URL's
/// query, in a list, as a map's name, and through the environment.
fn plantings(section: &str, key: &str) -> Vec<Planting> {
    let url = format!("https://server.smartlead.ai/api/v1?api_key={PLANTED}");
    let mut out = Vec::new();
    for value in [
        format!("{PLANTED:?}"),
        format!("{url:?}"),
        format!("[{PLANTED:?}]"),
        format!("{{ {PLANTED:?} = 1 }}"),
        format!("{{ a = {PLANTED:?} }}"),
    ] {
        let file = if section == "accounts" {
            let other = if key == "name" {
                "key_env = \"K\""
            } else {
                "name = \"a\""
            };
            format!("[[accounts]]\n{other}\n{key} = {value}\n")
        } else {
            format!("[{section}]\n{key} = {value}\n")
        };
        out.push((vec![], Some(file)));
    }
    if section != "accounts" {
        let var = format!(
            "SMARTLEAD_PROXY__{}__{}",
            section.to_uppercase(),
            key.to_uppercase()
        );
        out.push((vec![(var.clone(), PLANTED.to_owned())], None));
        out.push((vec![(var, url)], None));
    }
    out
}

#[test]
fn no_configuration_error_shows_a_key_put_in_any_setting() {
    let defaults: toml::Table = Settings::default().to_toml().parse().unwrap();
    let mut settings: Vec<(String, String)> = defaults
        .iter()
        .filter_map(|(section, t)| Some((section, t.as_table()?)))
        .flat_map(|(section, t)| t.keys().map(move |k| (section.clone(), k.clone())))
        .collect();
    for key in ["name", "key_env", "windows", "tokens"] {
        settings.push(("accounts".into(), key.into()));
    }
    for key in ["api_key", "requests", "period", "lease"] {
        settings.push(("upstream".into(), key.into()));
        settings.push(("limit".into(), key.into()));
    }
    assert!(settings.len() > 50, "{settings:?}");
    let matcher = ApiKey::new(PLANTED).secrets();
    let mut refused = 0;
    for (section, key) in &settings {
        for (vars, file) in plantings(section, key) {
            // The environment's key is another one: the error has nothing to scrub
            // with, so it must not have shown the value in the first place.
            let mut vars: Vec<(&str, &str)> =
                vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            vars.push(("K", "another-key-entirely"));
            let Err(err) = load(&vars, file.as_deref()) else {
                continue;
            };
            refused += 1;
            let err = err.to_string();
            assert!(
                matches!(matcher.scrub(&err), std::borrow::Cow::Borrowed(_)),
                "{section}.{key} ({file:?} {vars:?}): {err}"
            );
        }
    }
    assert!(refused > 200, "{refused} refused");
}

#[test]
fn the_shown_settings_hold_no_key_even_in_a_free_text_setting() {
    let file = format!("[redis]\nkey = {PLANTED:?}\n[log]\nlevel = {PLANTED:?}\n");
    let s = load(&[(API_KEY_VAR, PLANTED)], Some(&file)).unwrap();
    let shown = s.to_toml();
    let matcher = ApiKey::new(PLANTED).secrets();
    assert!(
        matches!(matcher.scrub(&shown), std::borrow::Cow::Borrowed(_)),
        "{shown}"
    );
    assert!(shown.contains("[redis]"), "{shown}");
}

#[test]
fn integer_settings_refuse_fractions_and_errors_name_the_key_set() {
    for (setting, value) in [
        ("server]\nmax_body_bytes", "1048576.9"),
        ("server]\nmax_body_bytes", "1e30"),
        ("limit]\nmax_queue", "0"),
        ("limit]\nmax_queue", "2.5"),
        ("retry]\nstatuses", "[429.5]"),
        ("limit]\nclient_weights", "{ ui = 1.5 }"),
        ("leads]\nmax_per_request", "-1"),
    ] {
        let err = load(&[], Some(&format!("[{setting} = {value}\n")))
            .unwrap_err()
            .to_string();
        let key = setting.replace("]\n", ".");
        assert!(err.contains(&key), "{key} = {value}: {err}");
    }
    let ok = load(&[("SMARTLEAD_PROXY__SERVER__MAX_BODY_BYTES", "2048")], None).unwrap();
    assert_eq!(
        ok.server.max_body_bytes, 2048,
        "whole numbers from the environment"
    );
    let ok = load(&[], Some("[server]\nmax_body_bytes = 1024.0\n")).unwrap();
    assert_eq!(
        ok.server.max_body_bytes, 1024,
        "a float with no fraction is whole"
    );
}

#[test]
fn an_account_has_at_most_sixteen_windows() {
    let windows = |n: usize| {
        (1..=n)
            .map(|i| format!("\"{i}/{i}s\""))
            .collect::<Vec<_>>()
            .join(",")
    };
    assert!(
        load(
            &[],
            Some(&format!("[limit]\nwindows = [{}]\n", windows(16)))
        )
        .is_ok()
    );
    let err = load(
        &[],
        Some(&format!("[limit]\nwindows = [{}]\n", windows(17))),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("limit.windows") && err.contains("16"), "{err}");
    let file = format!(
        "[[accounts]]\nname = \"a\"\nkey_env = \"K\"\nwindows = [{}]\n",
        windows(17)
    );
    let err = load(&[("K", "some-key-1")], Some(&file))
        .unwrap_err()
        .to_string();
    assert!(err.contains("accounts[a].windows"), "{err}");
}

#[test]
fn an_unreadable_or_broken_file_is_named() {
    let dir = std::env::temp_dir().join(format!("slp-dir-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let env: HashMap<String, String> = [(API_KEY_VAR.to_owned(), "key".to_owned())].into();
    let err = Settings::load_from(Path::new("/nonexistent"), Some(&dir), &env)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&dir.display().to_string()), "{err}");
    let err = Settings::load_from(&dir, None, &env)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&dir.display().to_string()),
        "the default file too: {err}"
    );
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, format!("[upstream]\nbase_url = {PLANTED}\n")).unwrap();
    let err = Settings::load_from(Path::new("/nonexistent"), Some(&broken), &env)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.toml") && err.contains("line 2"),
        "{err}"
    );
    assert!(!err.contains(&PLANTED[..12]), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn base_url_is_checked_and_credentials_masked() {
    assert!(BaseUrl::parse("ftp://x").is_err());
    assert!(BaseUrl::parse("https://x/api?a=1").is_err());
    assert!(BaseUrl::parse("not a url").is_err());
    let err = BaseUrl::parse("https://user:s3cret@x/api").unwrap_err();
    assert!(
        err.contains("https://***@x/api") && !err.contains("s3cret"),
        "{err}"
    );
    let err = BaseUrl::parse("ftp://user:s3cret@x/api").unwrap_err();
    assert!(!err.contains("s3cret"), "{err}");
    let url = BaseUrl::parse("http://127.0.0.1:9/api/v1/").unwrap();
    assert_eq!(url.path(), "/api/v1");
    assert_eq!(url.to_string(), "http://127.0.0.1:9/api/v1");
}
