//! `drover`: parse flags, start logging, run the command.

use clap::Parser;
use drover_protocol::telemetry;

fn main() {
    let cli = drover::commands::Cli::parse();
    if !matches!(cli.command, drover::commands::Command::Serve(_)) {
        default_sigpipe();
    }
    telemetry::init("info", telemetry::Format::Text);
    match drover::commands::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Lets SIGPIPE end the process, as it does `cat` and `grep`: `drover job list | head`
/// then stops quietly when `head` does, instead of panicking in `println!` on a closed
/// pipe. The server keeps Rust's default (ignored), so a closed stdout never kills it.
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
