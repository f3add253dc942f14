//! Tracing set-up: JSON lines by default, `pretty` for humans; `RUST_LOG` wins over
//! `log.level`, and the traffic log is let through at debug level when it is switched on.
//!
//! Every line goes through [`Redacting`] on its way out: the proxy's secrets, in any form
//! [`Secrets`] finds, and any `api_key` value are replaced with `***`, whoever wrote the
//! line (a dependency's warning that quotes an upstream URI included). Panics are logged
//! as one line too ([`install_panic_hook`]).

use std::io::Write;
use std::sync::{Arc, RwLock};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogFormat, LogSettings};
use crate::key::Secrets;

/// Installs the global subscriber writing to stdout once; later calls (as in tests) are
/// no-ops. `secrets` are redacted from every line.
pub fn init(log: &LogSettings, secrets: Secrets) {
    init_with_writer(log, Redacting::new(std::io::stdout, secrets));
}

/// [`init`], writing somewhere else.
pub fn init_with_writer<W>(log: &LogSettings, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Turning the traffic log on is asking to see it, whatever the general level.
    let filter = if log.bodies || log.allow_debug_header {
        match format!("{}=debug", crate::traffic::TARGET).parse() {
            Ok(directive) => filter.add_directive(directive),
            Err(_) => filter,
        }
    } else {
        filter
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.pretty().try_init(),
    };
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
