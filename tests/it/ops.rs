//! Running it in production: the real binary (start-up validation, check-config,
//! signals, shutdown), access tokens, readiness and metrics, the deployment files, the
//! log sink, and the debugging aids.

mod debugging;
mod deploy;
mod process;
mod production;
mod telemetry;
