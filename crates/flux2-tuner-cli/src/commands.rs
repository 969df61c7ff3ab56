//! One function per subcommand.

use anyhow::{Context, Result};
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::check_dit_checkpoint;
use flux2_tuner::models::ModelVersion;

use crate::cli::{Cli, Command, InspectArgs};

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect(&args),
        Command::Selftest(args) => crate::selftest::run(&args),
        Command::Generate(args) => crate::generate::run(&args),
        Command::Train(args) => crate::train::run(&args),
        Command::Plan(args) => crate::plan::run(&args),
        Command::CacheLatents(args) => crate::cache_latents::run(&args),
        Command::CacheTextEncoderOutputs(args) => crate::cache_text::run(&args),
    }
}

fn inspect(args: &InspectArgs) -> Result<()> {
    let expected = args
        .model_version
        .as_deref()
        .map(str::parse::<ModelVersion>)
        .transpose()?;
    let checkpoint = Checkpoint::open(&args.dit)?;
    let config = check_dit_checkpoint(&checkpoint, expected)
        .with_context(|| format!("checking {}", args.dit.display()))?;
    let versions = ModelVersion::matching_architecture(&config);
    let names: Vec<&str> = versions.iter().map(|v| v.name()).collect();
    println!("file: {}", args.dit.display());
    println!(
        "tensors: {} (all keys, shapes and dtypes valid)",
        checkpoint.len()
    );
    println!(
        "architecture: hidden {}, {} heads x {}, {} double + {} single blocks, context {}, guidance \
         embedding {}",
        config.hidden_size,
        config.num_heads,
        config.head_dim(),
        config.depth,
        config.depth_single_blocks,
        config.context_in_dim,
        if config.guidance_embed { "yes" } else { "no" }
    );
    println!("parameters: {}", config.parameter_count());
    if names.is_empty() {
        println!("version: none of the real FLUX.2 sizes (a test model)");
    } else {
        println!("version: {}", names.join(" or "));
    }
    Ok(())
}
