//! Tracing set-up: JSON lines by default, `pretty` for humans; `RUST_LOG` wins over
//! `log.level`, and the traffic log is let through at debug level when it is switched on.
//!
//! Every line goes through [`Redacting`] on its way out: the proxy's secrets, in any form
//! [`Secrets`] finds, and any `api_key` value are replaced with `***`, whoever wrote the
//! line (a dependency's warning that quotes an upstream URI included). Panics are logged
//! as one line too ([`install_panic_hook`]).

use std::io::Write;
use std::sync::{Arc, OnceLock, RwLock};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogFormat, LogSettings};
use crate::key::Secrets;

/// Installs the global subscriber writing to stdout once; later calls (as in tests) are
/// no-ops. `secrets` are redacted from every line.
pub fn init(log: &LogSettings, secrets: Secrets) {
    let writer = Redacting::new(std::io::stdout, secrets);
    let _ = SECRETS.set(writer.secrets());
    init_with_writer(log, writer);
}

/// The running log's secrets (set by [`init`]).
static SECRETS: OnceLock<Arc<RwLock<Secrets>>> = OnceLock::new();
/// Replaces the running log's filter (set by the first [`init_with_writer`]).
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// A reload's log settings: the level (unless `RUST_LOG` decides it) and the secrets to
/// redact. The format is fixed at start.
pub fn reload(log: &LogSettings, secrets: Secrets) -> Result<(), String> {
    if let Some(held) = SECRETS.get() {
        *held.write().unwrap_or_else(|e| e.into_inner()) = secrets;
    }
    if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some() {
        return Ok(());
    }
    match SET_FILTER.get() {
        Some(set) => set(filter(
            log,
            EnvFilter::try_new(&log.level).map_err(|e| e.to_string())?,
        )),
        None => Ok(()),
    }
}

/// `base`, letting the traffic log through when it is switched on: turning it on is
/// asking to see it, whatever the general level.
fn filter(log: &LogSettings, base: EnvFilter) -> EnvFilter {
    if log.bodies || log.allow_debug_header {
        match format!("{}=debug", crate::traffic::TARGET).parse() {
            Ok(directive) => base.add_directive(directive),
            Err(_) => base,
        }
    } else {
        base
    }
}

/// [`init`], writing somewhere else.
pub fn init_with_writer<W>(log: &LogSettings, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let base = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(log, base))
        .with_writer(writer);
    match log.format {
        LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                let _ = SET_FILTER.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }
        LogFormat::Pretty => {
            let builder = builder.pretty().with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                let _ = SET_FILTER.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }
    }
}

/// Logs a panic as one error record (message, location, thread) instead of the default
/// multi-line text on stderr; the request it happened in is answered 500 with its id.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        tracing::error!(
            target: "smartlead_proxy::panic",
            panic = %message,
            location,
            thread,
            "panic: a bug in the proxy (the request it happened in is answered 500 INTERNAL_ERROR)"
        );
    }));
}

/// A [`MakeWriter`] whose lines have the secrets (and any `api_key` value) redacted.
/// The secrets can be replaced while it runs (a reload brings new keys).
pub struct Redacting<M> {
    inner: M,
    secrets: Arc<RwLock<Secrets>>,
}

impl<M> Redacting<M> {
    pub fn new(inner: M, secrets: Secrets) -> Self {
        Self {
            inner,
            secrets: Arc::new(RwLock::new(secrets)),
        }
    }

    /// A handle that replaces the secrets this writer redacts.
    pub fn secrets(&self) -> Arc<RwLock<Secrets>> {
        self.secrets.clone()
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacting<M> {
    type Writer = RedactedLine<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactedLine {
            inner: self.inner.make_writer(),
            secrets: self
                .secrets
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            line: Vec::new(),
        }
    }
}

/// One record, held until it is complete so a secret split across writes is still
/// found, then written redacted.
pub struct RedactedLine<W: Write> {
    inner: W,
    secrets: Secrets,
    line: Vec<u8>,
}

impl<W: Write> Write for RedactedLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for RedactedLine<W> {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        let clean = self.secrets.redact(&text);
        let _ = self.inner.write_all(clean.as_bytes());
        let _ = self.inner.flush();
    }
}
