//! `drover`: parse flags, start logging, run the command.

use clap::Parser;

fn main() {
    let cli = drover::cli::Cli::parse();
    if !matches!(cli.command, drover::cli::Command::Serve(_)) {
        default_sigpipe();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match drover::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Lets SIGPIPE end the process, as it does `cat` and `grep`: `drover job list | head` then
/// stops quietly when `head` does, instead of panicking in `println!` on a closed pipe.
/// The server keeps Rust's default (ignored), so a closed stdout never kills it.
#[cfg(unix)]
fn default_sigpipe() {
    // SAFETY: called first thing in `main`, before any other thread exists, and SIG_DFL
    // is not a handler: nothing runs in signal context.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn default_sigpipe() {}
