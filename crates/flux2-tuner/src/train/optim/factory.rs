//! `--optimizer_type` as Musubi resolves it (`trainer_base.get_optimizer`, training-and-data.md
//! §5.1): the built-ins `adamw`, `adamw8bit` and `adafactor` case-insensitively, other names as
//! Python paths (`prodigyopt.Prodigy`, `bitsandbytes.optim.AdamW8bit`, `bitsandbytes.optim.Lion`,
//! `lion_pytorch.Lion`, `transformers.optimization.Adafactor`, also with the defining module as
//! `class.__module__` spells it). Plain `Prodigy` and `Lion` would be looked up in `torch.optim`,
//! which has neither, and fail in Musubi; they are taken here as the obvious intent. Every other
//! name is an error listing what is available.

use candle_core::Var;

use crate::error::{Error, Result};
use crate::train::optim::adafactor::Adafactor;
use crate::train::optim::adamw::adamw_from_arguments;
use crate::train::optim::adamw8bit::AdamW8bit;
use crate::train::optim::arguments::OptimizerArguments;
use crate::train::optim::lion::{Lion, LionFlavour};
use crate::train::optim::prodigy::Prodigy;
use crate::train::optim::Optimizer;

/// What `--optimizer_type` accepts, for the error message and the CLI help.
pub const AVAILABLE_OPTIMIZERS: &str = "AdamW, AdamW8bit (bitsandbytes.optim.AdamW8bit), \
     Adafactor (transformers.optimization.Adafactor), Prodigy (prodigyopt.Prodigy), \
     Lion (lion_pytorch.Lion, bitsandbytes.optim.Lion)";

/// Builds the optimiser for `optimizer_type` with `--optimizer_args`; `learning_rate` is
/// `--learning_rate` (Adafactor's initial rate, Lion's decoupled decay).
pub fn build_optimizer(
    optimizer_type: &str,
    parameters_with_factors: Vec<(Var, f64)>,
    optimizer_args: &[String],
    learning_rate: f64,
) -> Result<Box<dyn Optimizer>> {
    let mut arguments = OptimizerArguments::parse(optimizer_args)?;
    let parameters = parameters_with_factors;
    let optimizer: Box<dyn Optimizer> = match optimizer_type.to_lowercase().as_str() {
        // Musubi's default "" fails; our CLI defaults to AdamW, so "" means that.
        "adamw" | "" => Box::new(adamw_from_arguments(
            parameters,
            &mut arguments,
            "torch.optim.adamw.AdamW",
        )?),
        "adamw8bit" => Box::new(AdamW8bit::from_arguments(
            parameters,
            &mut arguments,
            "bitsandbytes.optim.adamw.AdamW8bit",
        )?),
        "adafactor" => Box::new(Adafactor::musubi(
            parameters,
            &mut arguments,
            learning_rate,
        )?),
        "prodigy" => Box::new(Prodigy::from_arguments(parameters, &mut arguments)?),
        "lion" => Box::new(Lion::from_arguments(
            parameters,
            &mut arguments,
            LionFlavour::LionPytorch,
            learning_rate,
        )?),
        _ => match optimizer_type {
            "torch.optim.AdamW" | "torch.optim.adamw.AdamW" => Box::new(adamw_from_arguments(
                parameters,
                &mut arguments,
                "torch.optim.adamw.AdamW",
            )?),
            "bitsandbytes.optim.AdamW8bit" | "bitsandbytes.optim.adamw.AdamW8bit" => {
                Box::new(AdamW8bit::from_arguments(
                    parameters,
                    &mut arguments,
                    "bitsandbytes.optim.adamw.AdamW8bit",
                )?)
            }
            "transformers.optimization.Adafactor" | "transformers.Adafactor" => Box::new(
                Adafactor::from_arguments(parameters, &mut arguments, learning_rate, false)?,
            ),
            "prodigyopt.Prodigy" | "prodigyopt.prodigy.Prodigy" => {
                Box::new(Prodigy::from_arguments(parameters, &mut arguments)?)
            }
            "lion_pytorch.Lion" | "lion_pytorch.lion_pytorch.Lion" => {
                Box::new(Lion::from_arguments(
                    parameters,
                    &mut arguments,
                    LionFlavour::LionPytorch,
                    learning_rate,
                )?)
            }
            "bitsandbytes.optim.Lion" | "bitsandbytes.optim.lion.Lion" => {
                Box::new(Lion::from_arguments(
                    parameters,
                    &mut arguments,
                    LionFlavour::Bitsandbytes,
                    learning_rate,
                )?)
            }
            other => {
                return Err(Error::InvalidArgument {
                    name: "--optimizer_type".into(),
                    message: format!(
                        "`{other}` is not available; choose one of: {AVAILABLE_OPTIMIZERS}"
                    ),
                })
            }
        },
    };
    Ok(optimizer)
}
