//! The integration suite, one binary, one module per feature (as ripgrep's tests/tests.rs).
//!
//! Every test runs real sockets: the simulated SmartLead (`smartlead_proxy::sim`), the
//! proxy in-process or as the real binary, real Redis servers started on free ports.
//! `support` holds the shared helpers; every in-process proxy's log lines are captured
//! and scanned for the key when it stops.
//!
//! | module | what it covers |
//! |---|---|
//! | `forwarding` | requests reach SmartLead intact, with the key injected; streaming; a real client |
//! | `key_safety` | the key never reaches a client or a log line, in any form |
//! | `envelope` | every non-2xx answer is SmartLead's JSON envelope |
//! | `quota` | the shared quota: windows, waiting instead of failing, deadlines |
//! | `accounts` | several windows, several accounts, client-key quotas |
//! | `fairness` | clients take turns: weights, priorities, per-client caps |
//! | `fleet` | everything on Redis: the fleet's fair line, modes (TLS, Cluster, Sentinel), faults, the shared cache |
//! | `retries` | retries, Retry-After, the retry budget |
//! | `leads` | the lead-import guard, auto-batching, SmartLead's own rate-limit headers |
//! | `cache` | the response cache and coalescing in one instance |
//! | `ops` | the real binary: start-up, check-config, signals, tokens, metrics, deploy files, logs |
//! | `reload` | reloading while serving |
//! | `status` | the status page, /status.json and `smartlead-proxy status` |
//! | `tls` | the HTTPS path to SmartLead, CAs and CONNECT proxies |
//! | `docs` | every link and anchor in the Markdown resolves; the configuration page matches `check-config` |
//! | `hardening` | faults and hostile input end in an envelope or a closed connection |
//! | `load` | 10,000 concurrent clients through the real binary |

mod support;

mod accounts;
mod cache;
mod docs;
mod envelope;
mod fairness;
mod fleet;
mod forwarding;
mod hardening;
mod key_safety;
mod leads;
mod load;
mod ops;
mod quota;
mod reload;
mod retries;
mod status;
mod tls;
