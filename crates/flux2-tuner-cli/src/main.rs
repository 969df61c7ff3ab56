//! `flux2-tuner`: fine-tune (LoRA) and run FLUX.2 models. This binary only parses arguments and
//! reports; the work is done by the `flux2_tuner` library.

use std::process::ExitCode;

use clap::Parser;

mod cache_latents;
mod cache_progress;
mod cache_text;
mod cli;
mod commands;
mod config_file;
mod device;
mod generate;
mod plan;
mod progress;
mod selftest;
mod train;
mod train_samples;

fn main() -> ExitCode {
    flux2_tuner::util::memory::keep_freed_buffers();
    let arguments = match config_file::expand(std::env::args().collect()) {
        Ok(arguments) => arguments,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = cli::Cli::parse_from(arguments);
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
