//! The `hufu` command: parse arguments, start logging, run, map errors to
//! exit codes. The server is the `hufu_node` library; this binary holds
//! only the tools around it: the command line (`cli`), the loopback demo,
//! the benchmarks and the surge load generators.

mod bench;
mod cli;
mod demo;
mod demo_replicas;
mod loadgen;
mod surge;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    if !matches!(cli.command, cli::Command::Serve { .. }) {
        // A command whose output goes into `| head` ends quietly when its
        // reader goes, as other Unix tools do, instead of panicking at its
        // next print. A server keeps ignoring SIGPIPE: its log's reader
        // going away must not stop it (its sockets never raise the signal).
        sigpipe::reset();
    }
    cli::init_tracing(&cli);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("hufu: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("hufu: {}", cli::explain::explain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
