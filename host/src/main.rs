//! The `wasm-echo` binary: parses the command line and hands off to the
//! library. An error ends the process with one line on stderr, never a
//! backtrace.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = wasm_echo::cli::Cli::parse();
    match wasm_echo::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", wasm_echo::cli::report(&error));
            ExitCode::FAILURE
        }
    }
}
