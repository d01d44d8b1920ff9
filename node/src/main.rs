//! The `hufu` command: parse arguments, start logging, run, map errors to
//! exit codes. Everything else lives in the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = hufu_node::cli::Cli::parse();
    hufu_node::cli::init_tracing(&cli);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("hufu: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(hufu_node::cli::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("hufu: {}", hufu_node::explain::explain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
