//! Logging, set up the same way by every binary: structured `tracing` events on stderr,
//! filtered by `DROVER_LOG` (an `EnvFilter` directive such as `info` or
//! `warn,drover=debug`), as text for people or JSON lines for log collectors.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event, with the fields of its spans.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err(format!("log format {s:?} must be text or json")),
        }
    }
}

/// The variable that overrides a binary's default filter.
pub const FILTER_VAR: &str = "DROVER_LOG";

/// Starts logging to stderr. `default` is the filter used when `DROVER_LOG` is unset or
/// invalid. Call once, first thing in `main`.
pub fn init(default: &str, format: Format) {
    let filter = EnvFilter::try_from_env(FILTER_VAR).unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        Format::Text => builder.init(),
        Format::Json => builder.json().init(),
    }
}
