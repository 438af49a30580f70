//! `hale`: the server, the CLI and the benchmarks in one binary.

mod bench;
mod cli;
mod demo;
mod demo_agent;
mod events_cli;
mod progress;
mod tasks_cli;

use anyhow::Result;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    cli::init_logging(&cli);
    let code = match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: cli::Cli) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let code = runtime.block_on(cli::run(cli))?;
    // Do not wait for detached blocking work (e.g. a stuck stdin reader) on the way out.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(code)
}

/// The error and its causes on one line, skipping a cause whose text an outer message
/// already includes (library errors often repeat their source in their own message).
fn describe(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}
