//! The deployment files parse and agree with the code: the Dockerfile would build, the
//! compose and Kubernetes files use real config keys and probes, the systemd unit is
//! hardened, the dashboard only queries metrics that exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_docs(path: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&read(path))
        .map(|d| {
            let mut v = Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}"));
            v.apply_merge().unwrap();
            v
        })
        .collect()
}

use serde::Deserialize;

/// Dockerfile instructions with continuation lines joined.
fn dockerfile() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

#[test]
fn dockerfile_would_build() {
    let instructions = dockerfile();
    let build_cmd = "cargo build --release --locked";
    assert_eq!(
        instructions
            .iter()
            .filter(|i| i.contains(build_cmd))
            .count(),
        2,
        "dependency layer and final build both use `{build_cmd}`"
    );
    for copy in instructions
        .iter()
        .filter(|i| i.starts_with("COPY ") && !i.contains("--from"))
    {
        let parts: Vec<&str> = copy.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                root().join(src).exists(),
                "COPY source {src} does not exist"
            );
        }
    }
    // Every target Cargo.toml declares gets a stub in the dependency layer.
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    for bench in manifest
        .get("bench")
        .and_then(|b| b.as_array())
        .into_iter()
        .flatten()
    {
        let name = bench["name"].as_str().unwrap();
        assert!(
            instructions.iter().any(|i| i.contains("benches/")
                && i.split(|c: char| !c.is_alphanumeric() && c != '_')
                    .any(|w| w == name)),
            "no stub for bench {name}"
        );
    }
    // Every patched crate's source is there before the dependency layer builds.
    let first_build = instructions
        .iter()
        .position(|i| i.contains(build_cmd))
        .unwrap();
    for (name, patch) in manifest
        .get("patch")
        .and_then(|p| p.get("crates-io"))
        .and_then(|p| p.as_table())
        .into_iter()
        .flatten()
    {
        let Some(path) = patch.get("path").and_then(|p| p.as_str()) else {
            continue;
        };
        let top = path.split('/').next().unwrap();
        assert!(
            instructions[..first_build]
                .iter()
                .any(|i| i.starts_with("COPY ") && i.split_whitespace().nth(1) == Some(top)),
            "the patched {name} ({path}) is not copied before the dependency layer"
        );
    }
    let has = |prefix: &str| instructions.iter().any(|i| i.starts_with(prefix));
    assert!(has("FROM gcr.io/distroless/cc-debian12:nonroot"));
    assert!(has("USER nonroot"));
    assert!(has("EXPOSE 8787"));
    assert!(has("ENV SMARTLEAD_PROXY__SERVER__LISTEN=0.0.0.0:8787"));
    assert!(
        instructions
            .iter()
            .any(|i| i.starts_with("HEALTHCHECK") && i.contains("\"healthcheck\""))
    );
    assert!(
        !instructions
            .iter()
            .any(|i| i.contains("SMARTLEAD_API_KEY=")),
        "no key baked in"
    );
    let ignored = read(".dockerignore");
    for needed in ["src", "config", "benches", "Cargo.toml", "Cargo.lock"] {
        assert!(
            !ignored.lines().any(|l| l.trim() == needed),
            "{needed} is dockerignored"
        );
    }
}

/// Every `SMARTLEAD_PROXY__…` variable a deploy file sets must be a key the proxy accepts.
fn assert_env_is_valid(env: &HashMap<String, String>, file: &str) {
    let mut env: HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with("SMARTLEAD_"))
        .map(|(k, v)| {
            (
                k.clone(),
                if v.contains("${") {
                    "placeholder".into()
                } else {
                    v.clone()
                },
            )
        })
        .collect();
    env.insert("SMARTLEAD_API_KEY".into(), "placeholder".into());
    smartlead_proxy::Settings::load_from(Path::new("/nonexistent"), None, &env)
        .unwrap_or_else(|e| panic!("{file}: {e}"));
}

fn str_map(v: &Value) -> HashMap<String, String> {
    v.as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn compose_runs_two_proxies_on_one_redis() {
    let docs = yaml_docs("deploy/docker-compose.yml");
    let services = &docs[0]["services"];
    for name in ["redis", "proxy-a", "proxy-b", "app"] {
        assert!(!services[name].is_null(), "service {name} missing");
    }
    let a = str_map(&services["proxy-a"]["environment"]);
    let b = str_map(&services["proxy-b"]["environment"]);
    assert_eq!(a, b, "both replicas share one configuration");
    assert_eq!(a["SMARTLEAD_PROXY__LIMIT__BACKEND"], "redis");
    assert!(a["SMARTLEAD_PROXY__REDIS__URL"].contains("redis:6379"));
    assert!(
        a["SMARTLEAD_API_KEY"].starts_with("${SMARTLEAD_API_KEY"),
        "key from the environment only"
    );
    assert_env_is_valid(&a, "docker-compose.yml");
    assert_eq!(
        services["proxy-a"]["build"]["dockerfile"].as_str(),
        Some("Dockerfile")
    );
    assert!(
        root()
            .join("deploy")
            .join(services["proxy-a"]["build"]["context"].as_str().unwrap())
            .join("Dockerfile")
            .exists()
    );
    for proxy in ["proxy-a", "proxy-b"] {
        let nofile = &services[proxy]["ulimits"]["nofile"];
        assert_eq!(nofile["hard"].as_u64(), Some(65536), "{proxy}: {nofile:?}");
    }
    let app_env = str_map(&services["app"]["environment"]);
    assert!(app_env["SMARTLEAD_BASE_URL"].ends_with(":8787/api/v1"));
    assert!(
        !app_env.contains_key("SMARTLEAD_API_KEY"),
        "the app never holds the key"
    );
}

#[test]
fn kubernetes_sidecar_is_wired_up() {
    let secret = &yaml_docs("deploy/kubernetes/secret.yaml")[0];
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    let redis = yaml_docs("deploy/kubernetes/redis.yaml");
    let service = redis
        .iter()
        .find(|d| d["kind"] == "Service")
        .expect("a Redis Service");
    let redis_host = service["metadata"]["name"].as_str().unwrap();
    let deployment = &yaml_docs("deploy/kubernetes/deployment.yaml")[0];
    assert_eq!(deployment["kind"], "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 30,
        "longer than shutdown_grace"
    );
    let containers = pod["containers"].as_sequence().unwrap();
    let proxy = containers
        .iter()
        .find(|c| c["name"] == "smartlead-proxy")
        .expect("sidecar");
    let app = containers
        .iter()
        .find(|c| c["name"] != "smartlead-proxy")
        .expect("app container");
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    let mut env = HashMap::new();
    for e in proxy["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        if name == "SMARTLEAD_API_KEY" {
            assert_eq!(
                e["valueFrom"]["secretKeyRef"]["name"].as_str(),
                Some(secret_name)
            );
        }
        env.insert(
            name,
            e["value"].as_str().unwrap_or("${from-secret}").to_owned(),
        );
    }
    assert!(env["SMARTLEAD_PROXY__REDIS__URL"].contains(redis_host));
    assert_env_is_valid(&env, "kubernetes/deployment.yaml");
    let app_env = app["env"].as_sequence().unwrap();
    assert!(
        app_env
            .iter()
            .any(|e| e["value"].as_str() == Some("http://127.0.0.1:8787/api/v1"))
    );
}

#[test]
fn systemd_unit_is_hardened() {
    let unit = read("deploy/systemd/smartlead-proxy.service");
    let settings: HashMap<&str, &str> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("KillSignal", "SIGTERM"),
        ("ExecStart", "/usr/local/bin/smartlead-proxy"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("LimitNOFILE", "65536"),
    ] {
        assert_eq!(settings.get(key).copied(), Some(want), "{key}");
    }
    assert!(settings["EnvironmentFile"].starts_with("/etc/smartlead-proxy/"));
    assert!(settings["TimeoutStopSec"].parse::<u32>().unwrap() > 30);
    for section in ["[Unit]", "[Service]", "[Install]"] {
        assert!(unit.contains(section), "{section}");
    }
}

#[test]
fn dashboard_queries_only_real_metrics() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/smartlead-proxy.json")).unwrap();
    let known = read("src/metrics.rs");
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let mut used = 0;
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("smartlead_proxy_") {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
                    assert!(
                        known.contains(&format!("\"smartlead_proxy_{base}\"")),
                        "unknown metric in dashboard: {word}"
                    );
                    used += 1;
                }
            }
        }
    }
    assert!(used >= 10);
}

#[test]
fn readme_documents_each_deployment() {
    let readme = read("README.md");
    for needle in [
        "docker build -t smartlead-proxy .",
        "docker compose -f deploy/docker-compose.yml up",
        "kubectl apply -f deploy/kubernetes/",
        "systemctl enable --now smartlead-proxy",
        "deploy/grafana/smartlead-proxy.json",
    ] {
        assert!(readme.contains(needle), "README lacks `{needle}`");
    }
}
