//! Tracing set-up: JSON lines by default, `pretty` for humans; `RUST_LOG` wins over
//! `log.level`, and the traffic log is let through at debug level when it is switched on.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber once; later calls (as in tests) are no-ops.
pub fn init(log: &LogSettings) {
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
        .with_writer(std::io::stdout);
    let _ = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.pretty().try_init(),
    };
}
