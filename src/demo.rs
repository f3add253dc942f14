//! `smartlead-proxy demo`: the proxy at work in under a minute, no account or network
//! needed. A simulated SmartLead with a small quota, 50 workers listing campaigns and
//! importing leads, first through the proxy, then calling the API directly with the
//! SmartLead guide's retry recipe, and a side-by-side summary.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::time::Instant;

use crate::Settings;
use crate::key::ApiKey;
use crate::sim::{Sim, SimConfig};

const KEY: &str = "demo-key";
const QUOTA: u32 = 10;
const PERIOD: Duration = Duration::from_secs(2);
const WORKERS: usize = 50;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What one phase achieved.
struct Summary {
    succeeded: usize,
    failed: usize,
    upstream_429: usize,
    quota_used: f64,
    wall: Duration,
}

/// Live counters behind the progress line.
#[derive(Default)]
struct Live {
    waiting: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicUsize,
}

pub async fn run() -> Result<(), String> {
    // Two identical simulated SmartLeads, so both ways run side by side.
    let config = SimConfig {
        api_key: Some(KEY.into()),
        requests: QUOTA,
        period: PERIOD,
        latency: Duration::from_millis(20),
        record: false,
        ..SimConfig::default()
    };
    let start_sim = || async {
        Sim::start(config.clone())
            .await
            .map_err(|e| format!("cannot start the simulated SmartLead: {e}"))
    };
    let (sim_proxy, sim_direct) = (start_sim().await?, start_sim().await?);
    let proxy_url = start_proxy(&sim_proxy).await?;
    println!(
        "Simulated SmartLead: {} requests per {}s per key (strict sliding window).",
        QUOTA,
        PERIOD.as_secs()
    );
    println!(
        "{WORKERS} workers each list campaigns and import 5 leads ({} requests), twice at once:\n\
         through the proxy, and straight to the API with the guide's retry recipe.\n",
        WORKERS * 2
    );
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let bars = MultiProgress::new();
    let direct_url = sim_direct.base_url();
    let (through, direct) = tokio::join!(
        phase(
            "via proxy",
            &bars,
            &sim_proxy,
            &client,
            &proxy_url,
            None,
            false
        ),
        phase(
            "direct+guide",
            &bars,
            &sim_direct,
            &client,
            &direct_url,
            Some(KEY),
            true
        ),
    );

    print_summary(&through, &direct);
    Ok(())
}

/// The two ways side by side.
fn print_summary(through: &Summary, direct: &Summary) {
    println!(
        "\n{:<26} {:>14} {:>14}",
        "", "through proxy", "direct + guide"
    );
    let row = |name: &str, a: String, b: String| println!("{name:<26} {a:>14} {b:>14}");
    row(
        "succeeded",
        through.succeeded.to_string(),
        direct.succeeded.to_string(),
    );
    row(
        "failed",
        through.failed.to_string(),
        direct.failed.to_string(),
    );
    row(
        "upstream 429s",
        through.upstream_429.to_string(),
        direct.upstream_429.to_string(),
    );
    row(
        "quota used",
        format!("{:.0}%", through.quota_used),
        format!("{:.0}%", direct.quota_used),
    );
    row(
        "wall time",
        format!("{:.1}s", through.wall.as_secs_f64()),
        format!("{:.1}s", direct.wall.as_secs_f64()),
    );
    println!(
        "\nThrough the proxy every worker simply waited its turn: no 429 reached SmartLead and no call failed."
    );
}

async fn start_proxy(sim: &Sim) -> Result<String, String> {
    let mut s = Settings::default();
    s.upstream.base_url = sim.base_url().parse()?;
    s.upstream.api_key = Some(ApiKey::new(KEY));
    s.limit.one_window(QUOTA, PERIOD);
    s.limit.max_wait = Duration::from_secs(60);
    s.validate().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(crate::run(listener, s, std::future::pending()));
    Ok(format!("http://{addr}/api/v1"))
}

async fn phase(
    name: &str,
    bars: &MultiProgress,
    sim: &Sim,
    client: &HttpClient,
    base: &str,
    key: Option<&str>,
    guide_recipe: bool,
) -> Summary {
    let total = (WORKERS * 2) as u64;
    let bar = bars.add(ProgressBar::new(total).with_prefix(name.to_owned()));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos:>3}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let live = Arc::new(Live::default());
    let started = Instant::now();
    let ticker = tick(bar.clone(), live.clone(), sim, started);
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (client, live) = (client.clone(), live.clone());
            let q = key.map(|k| format!("?api_key={k}")).unwrap_or_default();
            let list = format!("{base}/campaigns{q}");
            let import = format!("{base}/campaigns/{}/leads{q}", 1001 + w % 3);
            let leads = json!({"lead_list": (0..5)
                .map(|i| json!({"email": format!("{name}-{w}-{i}@example.com").replace(' ', "-"), "first_name": "Ada"}))
                .collect::<Vec<_>>()});
            let calls = [
                (Method::GET, list, Bytes::new()),
                (Method::POST, import, Bytes::from(leads.to_string())),
            ];
            tokio::spawn(work(client, live, calls, guide_recipe))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let wall = started.elapsed();
    ticker.abort();
    let stats = sim.stats();
    bar.set_position(total);
    bar.finish_with_message(format!(
        "done · failed {:>2} · upstream 429s {:>3} · {:.1}s",
        live.failed.load(Ordering::Relaxed),
        stats.rate_limited,
        wall.as_secs_f64()
    ));
    let accepted = stats.requests - stats.rate_limited;
    let windows = (wall.as_secs_f64() / PERIOD.as_secs_f64()).ceil().max(1.0);
    let failed = live.failed.load(Ordering::Relaxed);
    Summary {
        succeeded: total as usize - failed,
        failed,
        upstream_429: stats.rate_limited,
        quota_used: 100.0 * accepted as f64 / (f64::from(QUOTA) * windows),
        wall,
    }
}

/// Redraws a phase's bar ten times a second: what is done, waiting and failed, and the
/// upstream 429s so far.
fn tick(
    bar: ProgressBar,
    live: Arc<Live>,
    sim: &Sim,
    started: Instant,
) -> tokio::task::JoinHandle<()> {
    let stats = sim_stats_fn(sim);
    tokio::spawn(async move {
        loop {
            let s = stats();
            bar.set_position(live.done.load(Ordering::Relaxed) as u64);
            bar.set_message(format!(
                "waiting {:>2} · failed {:>2} · upstream 429s {:>3} · {:.0}s",
                live.waiting.load(Ordering::Relaxed),
                live.failed.load(Ordering::Relaxed),
                s.1,
                started.elapsed().as_secs_f64()
            ));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// One worker's calls, one after another, counted in `live`.
async fn work(
    client: HttpClient,
    live: Arc<Live>,
    calls: [(Method, String, Bytes); 2],
    guide_recipe: bool,
) {
    for (method, url, body) in calls {
        live.waiting.fetch_add(1, Ordering::Relaxed);
        let ok = if guide_recipe {
            guide_call(&client, method, &url, body).await
        } else {
            call(&client, method, &url, body)
                .await
                .is_ok_and(|(s, _)| s < 300)
        };
        live.waiting.fetch_sub(1, Ordering::Relaxed);
        live.done.fetch_add(1, Ordering::Relaxed);
        if !ok {
            live.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A cheap handle on the simulator's counters for the ticker task.
fn sim_stats_fn(sim: &Sim) -> impl Fn() -> (usize, usize) + Send + 'static {
    let state = sim.shared();
    move || {
        let s = state.stats();
        (s.requests, s.rate_limited)
    }
}

async fn call(
    client: &HttpClient,
    method: Method,
    url: &str,
    body: Bytes,
) -> Result<(u16, Option<f64>), String> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let _ = resp.into_body().collect().await;
    Ok((status, retry_after))
}

/// The SmartLead guide's recipe: up to 3 retries on 429/500/502/503,
/// `2^attempt + uniform(0,1)` seconds, at least `Retry-After`.
async fn guide_call(client: &HttpClient, method: Method, url: &str, body: Bytes) -> bool {
    for attempt in 0..=3 {
        match call(client, method.clone(), url, body.clone()).await {
            Ok((s, _)) if s < 300 => return true,
            Ok((s, retry_after)) if [429, 500, 502, 503].contains(&s) && attempt < 3 => {
                let backoff = 2f64.powi(attempt + 1) + rand::random::<f64>();
                let wait = backoff.max(retry_after.unwrap_or(0.0));
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            }
            _ => return false,
        }
    }
    false
}
