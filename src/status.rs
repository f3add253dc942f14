//! What a person looks at: `/status.json` (accounts, windows with their use, waiting and
//! served per client, pauses, the limiter, recent errors, retry budgets), the same as one
//! self-contained HTML page (`/status`: rendered by the server, refreshed every second
//! by an inline script), and the terminal table of `smartlead-proxy status`.
//!
//! Everything comes from the limiters and the answer path ([`crate::recent`]), never from
//! /metrics; nothing shown is a key.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::accounts::Accounts;
use crate::limiter::{ClientUse, Status};
use crate::recent::ErrorAnswer;

/// The whole picture.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: String,
    pub uptime_seconds: u64,
    pub limiter: LimiterView,
    pub accounts: Vec<AccountView>,
    pub retry_budget: Vec<BudgetView>,
    pub recent_errors: Vec<ErrorAnswer>,
    /// With `limit.backend = "redis"`: every instance whose lease is live (absent when
    /// Redis does not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Vec<crate::limiter::redis::Instance>>,
    /// With the fleet: requests waiting per account and client over every instance, as
    /// their leases last told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_waiting: Option<BTreeMap<String, BTreeMap<String, usize>>>,
    /// With the fleet, per account: how evenly its line shared the slots between the
    /// clients that waited over the last minute.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fleet_fairness: BTreeMap<String, Fairness>,
    /// With the cache or the coalescing line in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheView>,
}

/// The response cache in this process, and per account what it and the coalescing line
/// saved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheView {
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub evictions: u64,
    pub accounts: BTreeMap<String, CacheAccountView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheAccountView {
    pub entries: u64,
    pub bytes: u64,
    pub hits: u64,
    pub stale: u64,
    pub misses: u64,
    pub bypass: u64,
    pub collapsed: u64,
    /// Reads answered without an upstream call of their own, of all reads.
    pub hit_ratio: f64,
    /// Upstream calls saved: hits, stale answers and collapsed followers.
    pub saved: u64,
}

/// Jain's fairness index of the turns (slots / weight) the fleet's line gave the clients
/// that waited over the last minute: 1 when every one got its weight's share, 1/n when
/// one of n got them all.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Fairness {
    pub jain: f64,
    pub clients: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LimiterView {
    pub backend: String,
    pub state: String,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountView {
    pub name: String,
    pub windows: Vec<WindowView>,
    pub waiting: usize,
    /// RFC 3339, while a pause this process asked for lasts.
    pub paused_until: Option<String>,
    /// Seconds left of that pause (for the countdown).
    pub paused_seconds: Option<f64>,
    pub clients: Vec<ClientView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowView {
    pub label: String,
    pub requests: usize,
    pub period_seconds: f64,
    /// Starts in the window now.
    pub used: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientView {
    pub id: String,
    pub waiting: usize,
    pub served: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetView {
    pub account: String,
    /// Retries the budget allows now.
    pub left: u32,
}

impl From<ClientUse> for ClientView {
    fn from(c: ClientUse) -> Self {
        Self {
            id: c.id,
            waiting: c.waiting,
            served: c.served,
        }
    }
}

fn started() -> Instant {
    static STARTED: OnceLock<Instant> = OnceLock::new();
    *STARTED.get_or_init(Instant::now)
}

/// Starts the uptime clock (at start; otherwise the first look starts it).
pub fn start_clock() {
    started();
}

/// The picture now.
pub async fn snapshot(accounts: &Accounts, cache: &crate::cache::Cache) -> Snapshot {
    let all = accounts.all();
    let limiter = all.first().map_or(
        Status {
            backend: "local",
            state: "local",
            detail: None,
        },
        |a| a.limiter.status(),
    );
    let mut views = Vec::with_capacity(all.len());
    for a in &all {
        views.push(account_view(a).await);
    }
    let fleet = accounts.fleet().await;
    let mut fleet_fairness = BTreeMap::new();
    for a in &all {
        if let Some((jain, clients)) = a.limiter.fairness().await {
            fleet_fairness.insert(a.name.to_string(), Fairness { jain, clients });
        }
    }
    Snapshot {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: started().elapsed().as_secs(),
        limiter: LimiterView {
            backend: limiter.backend.to_owned(),
            state: limiter.state.to_owned(),
            detail: limiter.detail,
        },
        retry_budget: all
            .iter()
            .map(|a| BudgetView {
                account: a.name.to_string(),
                left: a.retry_budget.left(),
            })
            .collect(),
        accounts: views,
        recent_errors: crate::recent::newest_first(),
        fleet_waiting: fleet.as_deref().map(waiting_over),
        fleet,
        fleet_fairness,
        cache: cache_view(&all, cache).await,
    }
}

/// One account's windows, waiters, pause and clients.
async fn account_view(a: &crate::accounts::Account) -> AccountView {
    let windows = a
        .limiter
        .usage()
        .await
        .into_iter()
        .map(|(w, used)| WindowView {
            label: w.label,
            requests: w.limit,
            period_seconds: w.period.as_secs_f64(),
            used,
        })
        .collect();
    let paused = a.limiter.paused_until().map(|until| {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        (SystemTime::now() + left, left)
    });
    AccountView {
        name: a.name.to_string(),
        windows,
        waiting: a.limiter.queued(),
        paused_until: paused.map(|(at, _)| humantime::format_rfc3339_seconds(at).to_string()),
        paused_seconds: paused.map(|(_, left)| left.as_secs_f64()),
        clients: a.limiter.clients().into_iter().map(Into::into).collect(),
    }
}

async fn cache_view(
    all: &[std::sync::Arc<crate::accounts::Account>],
    cache: &crate::cache::Cache,
) -> Option<CacheView> {
    if !cache.in_use() {
        return None;
    }
    let store = cache.store();
    // Evictions moka has pending are done first, so the sizes are exact.
    store.settle().await;
    let sizes = &store.sizes;
    let (entries, bytes) = sizes.totals();
    let accounts = all
        .iter()
        .map(|a| {
            let [hits, stale, misses, bypass, collapsed] = a.cache.snapshot();
            let (entries, bytes) = sizes.of(&a.id);
            let view = CacheAccountView {
                entries,
                bytes,
                hits,
                stale,
                misses,
                bypass,
                collapsed,
                hit_ratio: a.cache.hit_ratio(),
                saved: a.cache.saved(),
            };
            (a.name.to_string(), view)
        })
        .collect();
    Some(CacheView {
        entries,
        bytes,
        max_bytes: store.max_bytes(),
        evictions: sizes.evictions(),
        accounts,
    })
}

/// Every instance's waiting clients, added up per account and client.
fn waiting_over(
    fleet: &[crate::limiter::redis::Instance],
) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for instance in fleet {
        for (account, clients) in &instance.clients {
            let here = out.entry(account.clone()).or_default();
            for (client, n) in clients {
                *here.entry(client.clone()).or_default() += n;
            }
        }
    }
    out
}

/// `&`, `<`, `>`, `"` and `'` escaped for HTML text and attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// How full a window is, as the class its bar is coloured by.
fn level(used: usize, requests: usize) -> &'static str {
    let share = used as f64 / requests.max(1) as f64;
    if share >= 0.9 {
        "full"
    } else if share >= 0.7 {
        "busy"
    } else {
        "ok"
    }
}

/// The body of the page for `s`: the same markup the script renders from /status.json.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let limiter = &s.limiter;
    out.push_str(&format!(
        "<header><h1>smartlead-proxy</h1><p class=\"meta\">v{} · up {}s · limiter <b class=\"state {}\">{} / {}</b>{}</p></header>",
        esc(&s.version),
        s.uptime_seconds,
        esc(&limiter.state),
        esc(&limiter.backend),
        esc(&limiter.state),
        limiter
            .detail
            .as_ref()
            .map(|d| format!(" <span class=\"detail\">{}</span>", esc(d)))
            .unwrap_or_default()
    ));
    out.push_str("<section class=\"accounts\">");
    for a in &s.accounts {
        out.push_str(&account_html(a, s));
    }
    out.push_str("</section>");
    if let Some(fleet) = &s.fleet {
        out.push_str(&fleet_html(
            fleet,
            s.fleet_waiting.as_ref(),
            &s.fleet_fairness,
        ));
    }
    if let Some(cache) = &s.cache {
        out.push_str(&cache_html(cache));
    }
    out.push_str(&errors_html(&s.recent_errors));
    out
}

/// The cache per account: what it holds and the upstream calls it saved (the script's
/// `cache` draws the same).
fn cache_html(c: &CacheView) -> String {
    let mut out = format!(
        "<section class=\"cache\"><h2>Cache</h2><p class=\"facts\">{} entries · {} of {} bytes · {} evicted</p><div class=\"scroll\"><table><thead><tr><th>account</th><th>entries</th><th>bytes</th><th>hits</th><th>stale</th><th>misses</th><th>collapsed</th><th>hit ratio</th><th>upstream calls saved</th></tr></thead><tbody>",
        c.entries, c.bytes, c.max_bytes, c.evictions
    );
    for (account, a) in &c.accounts {
        out.push_str(&format!(
            "<tr data-cache-account=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}%</td><td class=\"saved\">{}</td></tr>",
            esc(account),
            esc(account),
            a.entries,
            a.bytes,
            a.hits,
            a.stale,
            a.misses + a.bypass,
            a.collapsed,
            a.hit_ratio * 100.0,
            a.saved
        ));
    }
    out.push_str("</tbody></table></div></section>");
    out
}

/// The instances sharing the quota and who waits over all of them (the script's
/// `fleet` draws the same).
fn fleet_html(
    fleet: &[crate::limiter::redis::Instance],
    waiting: Option<&BTreeMap<String, BTreeMap<String, usize>>>,
    fairness: &BTreeMap<String, Fairness>,
) -> String {
    let mut out = String::from(
        "<section class=\"fleet\"><h2>Fleet</h2><div class=\"scroll\"><table><thead><tr><th>host</th><th>instance</th><th>waiting</th><th>lease age</th></tr></thead><tbody>",
    );
    for i in fleet {
        out.push_str(&format!(
            "<tr data-instance=\"{}\"><td class=\"host\">{}{}</td><td class=\"rid\">{}</td><td>{}</td><td>{:.1}s</td></tr>",
            esc(&i.id),
            esc(&i.host),
            if i.this { " (this one)" } else { "" },
            esc(&i.id),
            i.waiting,
            i.lease_age_seconds
        ));
    }
    out.push_str("</tbody></table></div><p class=\"facts\">waiting over the fleet:");
    for (account, clients) in waiting.into_iter().flatten() {
        for (client, n) in clients {
            out.push_str(&format!(
                " <span class=\"fleet-client\">{}/{} <b>{}</b></span>",
                esc(account),
                esc(client),
                n
            ));
        }
    }
    out.push_str("</p>");
    out.push_str(&fairness_html(fairness));
    out.push_str("</section>");
    out
}

fn fairness_html(fairness: &BTreeMap<String, Fairness>) -> String {
    let mut out = String::from("<p class=\"facts\">fairness over the last minute (Jain):");
    for (account, f) in fairness {
        out.push_str(&format!(
            " <span class=\"fairness\">{} <b>{:.2}</b> of {} clients</span>",
            esc(account),
            f.jain,
            f.clients
        ));
    }
    out.push_str("</p>");
    out
}

fn account_html(a: &AccountView, s: &Snapshot) -> String {
    let mut out = format!(
        "<article class=\"account\" data-account=\"{0}\"><h2>{0}</h2>",
        esc(&a.name)
    );
    if let Some(left) = a.paused_seconds {
        out.push_str(&format!(
            "<p class=\"pause\">paused by SmartLead: <span class=\"countdown\">{left:.0}</span> s left</p>"
        ));
    }
    for w in &a.windows {
        let pct = (100.0 * w.used as f64 / w.requests.max(1) as f64).min(100.0);
        out.push_str(&format!(
            "<div class=\"window\"><span class=\"label\">{}</span><span class=\"bar\"><span class=\"fill {}\" style=\"width:{pct:.0}%\"></span></span><span class=\"num\">{}/{}</span></div>",
            esc(&w.label),
            level(w.used, w.requests),
            w.used,
            w.requests
        ));
    }
    let budget = s
        .retry_budget
        .iter()
        .find(|b| b.account == a.name)
        .map_or(0, |b| b.left);
    out.push_str(&format!(
        "<p class=\"facts\">waiting <b class=\"waiting\">{}</b> · retries left <b>{budget}</b></p>",
        a.waiting
    ));
    out.push_str("<div class=\"scroll\"><table class=\"clients\"><thead><tr><th>client</th><th>waiting</th><th>served</th></tr></thead><tbody>");
    for c in &a.clients {
        out.push_str(&format!(
            "<tr><td class=\"client\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.id),
            c.waiting,
            c.served
        ));
    }
    out.push_str("</tbody></table></div></article>");
    out
}

fn errors_html(errors: &[ErrorAnswer]) -> String {
    let mut out = String::from(
        "<section class=\"errors\"><h2>Recent errors</h2><div class=\"scroll\"><table><thead><tr><th>at</th><th>status</th><th>code</th><th>request id</th><th>account</th><th>client</th><th>hint</th></tr></thead><tbody>",
    );
    for e in errors {
        out.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"rid\">{}</td><td>{}</td><td>{}</td><td class=\"hint\">{}</td></tr>",
            esc(&e.at),
            e.status,
            esc(&e.code),
            esc(&e.request_id),
            esc(e.account.as_deref().unwrap_or("")),
            esc(e.client.as_deref().unwrap_or("")),
            esc(e.hint.as_deref().unwrap_or(""))
        ));
    }
    out.push_str("</tbody></table></div></section>");
    out
}

/// The whole page: inline style and script, nothing fetched from anywhere but
/// /status.json on this proxy.
pub fn page(s: &Snapshot) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>smartlead-proxy status</title><link rel=\"icon\" href=\"data:,\"><style>{STYLE}</style></head><body><main id=\"status\">{}</main><script>{SCRIPT}</script></body></html>",
        render(s)
    )
}

/// The page's `Content-Security-Policy`: nothing runs or loads but its own script and
/// style (by hash) and `/status.json`; no framing, no forms, no base. Bar widths are
/// `style` attributes (numbers the proxy computes), the one thing allowed inline.
pub fn content_security_policy() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; style-src-attr 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            sha256(SCRIPT),
            sha256(STYLE)
        )
    })
}

/// A CSP source expression for inline text: `sha256-<base64>`.
fn sha256(text: &str) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

const STYLE: &str = r#"
:root{color-scheme:light dark;--bg:#fafafa;--fg:#1b1b1b;--muted:#666;--card:#fff;--line:#ddd;--ok:#2e9d5b;--busy:#d08a00;--full:#c93434;--track:#e8e8e8}
@media (prefers-color-scheme:dark){:root{--bg:#121417;--fg:#e6e6e6;--muted:#9aa0a6;--card:#1c1f24;--line:#30343a;--track:#2a2e34}}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif}
main{max-width:1240px;margin:0 auto;padding:16px}header h1{font-size:20px;margin:0}.meta{color:var(--muted);margin:4px 0 16px}
.state.shared,.state.local{color:var(--ok)}.state.fallback{color:var(--busy)}.state.unavailable{color:var(--full)}.detail{color:var(--muted)}
.accounts{display:flex;flex-wrap:wrap;gap:16px}.account{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px;flex:1 1 360px;min-width:0}
.account h2{margin:0 0 8px;font-size:16px}.window{display:grid;grid-template-columns:80px 1fr 90px;align-items:center;gap:8px;margin:6px 0}
.label{color:var(--muted);font-variant-numeric:tabular-nums}.bar{height:12px;background:var(--track);border-radius:6px;overflow:hidden;display:block}
.fill{display:block;height:100%;background:var(--ok)}.fill.busy{background:var(--busy)}.fill.full{background:var(--full)}
.num{text-align:right;font-variant-numeric:tabular-nums}.pause{color:var(--full);font-weight:600}.facts{color:var(--muted)}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600}.errors,.fleet,.cache{margin-top:16px}.errors h2,.fleet h2,.cache h2{font-size:16px}.rid{font-family:ui-monospace,monospace;font-size:12px}.hint{min-width:240px}
@media (max-width:600px){.window{grid-template-columns:60px 1fr 70px}main{padding:8px}}
"#;

const SCRIPT: &str = r#"
(function(){
var main=document.getElementById('status');
function esc(t){return String(t==null?'':t).replace(/[&<>"']/g,function(c){return{'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c];});}
function level(u,n){var s=u/Math.max(n,1);return s>=0.9?'full':s>=0.7?'busy':'ok';}
function account(a,s){
 var h='<article class="account" data-account="'+esc(a.name)+'"><h2>'+esc(a.name)+'</h2>';
 if(a.paused_seconds!=null){h+='<p class="pause">paused by SmartLead: <span class="countdown">'+Math.round(a.paused_seconds)+'</span> s left</p>';}
 a.windows.forEach(function(w){var p=Math.min(100,Math.round(100*w.used/Math.max(w.requests,1)));
  h+='<div class="window"><span class="label">'+esc(w.label)+'</span><span class="bar"><span class="fill '+level(w.used,w.requests)+'" style="width:'+p+'%"></span></span><span class="num">'+w.used+'/'+w.requests+'</span></div>';});
 var b=0;s.retry_budget.forEach(function(x){if(x.account===a.name){b=x.left;}});
 h+='<p class="facts">waiting <b class="waiting">'+a.waiting+'</b> · retries left <b>'+b+'</b></p>';
 h+='<div class="scroll"><table class="clients"><thead><tr><th>client</th><th>waiting</th><th>served</th></tr></thead><tbody>';
 a.clients.forEach(function(c){h+='<tr><td class="client">'+esc(c.id)+'</td><td>'+c.waiting+'</td><td>'+c.served+'</td></tr>';});
 return h+'</tbody></table></div></article>';}
function fleet(s){
 var h='<section class="fleet"><h2>Fleet</h2><div class="scroll"><table><thead><tr><th>host</th><th>instance</th><th>waiting</th><th>lease age</th></tr></thead><tbody>';
 s.fleet.forEach(function(i){h+='<tr data-instance="'+esc(i.id)+'"><td class="host">'+esc(i.host)+(i.this?' (this one)':'')+'</td><td class="rid">'+esc(i.id)+'</td><td>'+i.waiting+'</td><td>'+i.lease_age_seconds.toFixed(1)+'s</td></tr>';});
 h+='</tbody></table></div><p class="facts">waiting over the fleet:';
 var w=s.fleet_waiting||{};Object.keys(w).sort().forEach(function(a){Object.keys(w[a]).sort().forEach(function(c){h+=' <span class="fleet-client">'+esc(a)+'/'+esc(c)+' <b>'+w[a][c]+'</b></span>';});});
 h+='</p><p class="facts">fairness over the last minute (Jain):';
 var f=s.fleet_fairness||{};Object.keys(f).sort().forEach(function(a){h+=' <span class="fairness">'+esc(a)+' <b>'+f[a].jain.toFixed(2)+'</b> of '+f[a].clients+' clients</span>';});
 return h+'</p></section>';}
function cache(c){
 var h='<section class="cache"><h2>Cache</h2><p class="facts">'+c.entries+' entries · '+c.bytes+' of '+c.max_bytes+' bytes · '+c.evictions+' evicted</p><div class="scroll"><table><thead><tr><th>account</th><th>entries</th><th>bytes</th><th>hits</th><th>stale</th><th>misses</th><th>collapsed</th><th>hit ratio</th><th>upstream calls saved</th></tr></thead><tbody>';
 Object.keys(c.accounts).sort().forEach(function(n){var a=c.accounts[n];h+='<tr data-cache-account="'+esc(n)+'"><td>'+esc(n)+'</td><td>'+a.entries+'</td><td>'+a.bytes+'</td><td>'+a.hits+'</td><td>'+a.stale+'</td><td>'+(a.misses+a.bypass)+'</td><td>'+a.collapsed+'</td><td>'+Math.round(a.hit_ratio*100)+'%</td><td class="saved">'+a.saved+'</td></tr>';});
 return h+'</tbody></table></div></section>';}
function render(s){
 var l=s.limiter,h='<header><h1>smartlead-proxy</h1><p class="meta">v'+esc(s.version)+' · up '+s.uptime_seconds+'s · limiter <b class="state '+esc(l.state)+'">'+esc(l.backend)+' / '+esc(l.state)+'</b>'+(l.detail?' <span class="detail">'+esc(l.detail)+'</span>':'')+'</p></header>';
 h+='<section class="accounts">';s.accounts.forEach(function(a){h+=account(a,s);});h+='</section>';
 if(s.fleet){h+=fleet(s);}
 if(s.cache){h+=cache(s.cache);}
 h+='<section class="errors"><h2>Recent errors</h2><div class="scroll"><table><thead><tr><th>at</th><th>status</th><th>code</th><th>request id</th><th>account</th><th>client</th><th>hint</th></tr></thead><tbody>';
 s.recent_errors.forEach(function(e){h+='<tr><td>'+esc(e.at)+'</td><td>'+e.status+'</td><td>'+esc(e.code)+'</td><td class="rid">'+esc(e.request_id)+'</td><td>'+esc(e.account)+'</td><td>'+esc(e.client)+'</td><td class="hint">'+esc(e.hint)+'</td></tr>';});
 main.innerHTML=h+'</tbody></table></div></section>';main.setAttribute('data-refreshed',new Date().toISOString());}
function tick(){fetch('status.json',{cache:'no-store'}).then(function(r){return r.ok?r.json():null;}).then(function(s){if(s){render(s);}}).catch(function(){});}
setInterval(tick,1000);tick();
})();
"#;

/// The same picture for a terminal: a header line, a table of windows per account, one
/// of clients, then the fleet, the cache and recent errors when there are any.
pub fn table(s: &Snapshot) -> String {
    let mut out = header_line(s);
    out.push_str(&format!("{}\n", windows_table(s)));
    out.push_str(&format!("{}\n", clients_table(s)));
    if let Some(fleet) = &s.fleet {
        out.push_str(&format!("fleet\n{}\n", fleet_table(fleet)));
        for (account, f) in &s.fleet_fairness {
            out.push_str(&format!(
                "fairness over the last minute (Jain): {account} {:.2} of {} clients\n",
                f.jain, f.clients
            ));
        }
    }
    if let Some(c) = &s.cache {
        out.push_str(&format!(
            "cache: {} entries, {} of {} bytes, {} evicted\n{}\n",
            c.entries,
            c.bytes,
            c.max_bytes,
            c.evictions,
            cache_table(c)
        ));
    }
    if !s.recent_errors.is_empty() {
        out.push_str(&format!(
            "recent errors (newest first)\n{}\n",
            errors_table(&s.recent_errors)
        ));
    }
    out
}

fn new_table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

fn header_line(s: &Snapshot) -> String {
    let detail = s.limiter.detail.as_ref();
    format!(
        "smartlead-proxy {} · up {}s · limiter {} / {}{}\n",
        s.version,
        s.uptime_seconds,
        s.limiter.backend,
        s.limiter.state,
        detail.map(|d| format!(" ({d})")).unwrap_or_default()
    )
}

fn windows_table(s: &Snapshot) -> comfy_table::Table {
    let mut windows = new_table(&[
        "account",
        "window",
        "used",
        "limit",
        "waiting",
        "paused",
        "retries left",
    ]);
    for a in &s.accounts {
        let budget = s.retry_budget.iter().find(|b| b.account == a.name);
        let budget = budget.map_or(0, |b| b.left);
        let paused = a
            .paused_seconds
            .map_or_else(String::new, |left| format!("{left:.0}s"));
        for w in &a.windows {
            windows.add_row(vec![
                a.name.clone(),
                w.label.clone(),
                w.used.to_string(),
                w.requests.to_string(),
                a.waiting.to_string(),
                paused.clone(),
                budget.to_string(),
            ]);
        }
    }
    windows
}

fn clients_table(s: &Snapshot) -> comfy_table::Table {
    let mut clients = new_table(&["account", "client", "waiting", "served"]);
    for a in &s.accounts {
        for c in &a.clients {
            clients.add_row(vec![
                a.name.clone(),
                c.id.clone(),
                c.waiting.to_string(),
                c.served.to_string(),
            ]);
        }
    }
    clients
}

fn fleet_table(fleet: &[crate::limiter::redis::Instance]) -> comfy_table::Table {
    let mut instances = new_table(&["host", "instance", "waiting", "lease age"]);
    for i in fleet {
        let host = if i.this {
            format!("{} (this one)", i.host)
        } else {
            i.host.clone()
        };
        instances.add_row(vec![
            host,
            i.id.clone(),
            i.waiting.to_string(),
            format!("{:.1}s", i.lease_age_seconds),
        ]);
    }
    instances
}

fn cache_table(c: &CacheView) -> comfy_table::Table {
    let mut cache = new_table(&[
        "account",
        "entries",
        "bytes",
        "hits",
        "stale",
        "misses",
        "collapsed",
        "hit ratio",
        "upstream calls saved",
    ]);
    for (account, a) in &c.accounts {
        cache.add_row(vec![
            account.clone(),
            a.entries.to_string(),
            a.bytes.to_string(),
            a.hits.to_string(),
            a.stale.to_string(),
            (a.misses + a.bypass).to_string(),
            a.collapsed.to_string(),
            format!("{:.0}%", a.hit_ratio * 100.0),
            a.saved.to_string(),
        ]);
    }
    cache
}

fn errors_table(recent: &[ErrorAnswer]) -> comfy_table::Table {
    let mut errors = new_table(&[
        "at",
        "status",
        "code",
        "request id",
        "account",
        "client",
        "hint",
    ]);
    for e in recent.iter().take(10) {
        errors.add_row(vec![
            e.at.clone(),
            e.status.to_string(),
            e.code.clone(),
            e.request_id.clone(),
            e.account.clone().unwrap_or_default(),
            e.client.clone().unwrap_or_default(),
            e.hint.clone().unwrap_or_default(),
        ]);
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_bars_are_coloured_as_they_fill() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(level(1, 10), "ok");
        assert_eq!(level(7, 10), "busy");
        assert_eq!(level(10, 10), "full");
    }
}
