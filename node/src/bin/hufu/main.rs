//! The `hufu` command: parse arguments, start logging, run, map errors to
//! exit codes. The server is the `hufu_node` library; this binary holds
//! only the tools around it: the command line (`cli`), the loopback demo,
//! the benchmarks and the surge load generators.

mod bench;
mod cli;
mod demo;
mod demo_replicas;
mod loadgen;
mod output;
mod surge;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    cli::init_tracing(&cli);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .enable_all()
        .thread_name(hufu_node::lane::TERMINALS_THREAD);
    if let Some(threads) = cli.runtime_threads() {
        builder.worker_threads(threads);
    }
    let runtime = match builder.build() {
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
