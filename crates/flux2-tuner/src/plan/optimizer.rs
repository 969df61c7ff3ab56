//! Optimizer state sizes for `--optimizer_type` (training-and-data.md §5.1), per LoRA matrix:
//! torch AdamW keeps two f32 moments; bitsandbytes AdamW8bit two 1-byte moments plus one f32
//! absmax per block of 256 values each (`train::optim::blockwise`); transformers Adafactor factors a 2-D moment into a row
//! and a column vector; prodigyopt Prodigy keeps two moments, `s` and the initial weights `p0`
//! (four f32 copies); Lion one f32 moment.

use crate::error::{Error, Result};

use crate::train::optim::BLOCK_SIZE as BITSANDBYTES_BLOCK;

/// The optimizers whose state size is modelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    AdamW,
    AdamW8bit,
    Adafactor,
    Prodigy,
    Lion,
}

impl OptimizerKind {
    /// Parses Musubi's `--optimizer_type` values (case-insensitive, module paths allowed).
    pub fn parse(name: &str) -> Result<Self> {
        let short = name.rsplit('.').next().unwrap_or(name).to_lowercase();
        Ok(match short.as_str() {
            "adamw" => Self::AdamW,
            "adamw8bit" | "pagedadamw8bit" => Self::AdamW8bit,
            "adafactor" => Self::Adafactor,
            "prodigy" => Self::Prodigy,
            "lion" | "lion8bit" | "pagedlion" => Self::Lion,
            _ => {
                return Err(Error::InvalidArgument {
                    name: "--optimizer_type".into(),
                    message: format!(
                        "`{name}`: the planner models AdamW, AdamW8bit, Adafactor, Prodigy and Lion"
                    ),
                })
            }
        })
    }

    /// The name as printed.
    pub fn name(self) -> &'static str {
        match self {
            Self::AdamW => "AdamW",
            Self::AdamW8bit => "AdamW8bit",
            Self::Adafactor => "Adafactor",
            Self::Prodigy => "Prodigy",
            Self::Lion => "Lion",
        }
    }

    /// State bytes for one `[rows, columns]` f32 parameter matrix.
    pub fn state_bytes(self, rows: usize, columns: usize) -> u64 {
        let elements = (rows * columns) as u64;
        match self {
            Self::AdamW => 2 * 4 * elements,
            Self::AdamW8bit => {
                let blocks = elements.div_ceil(BITSANDBYTES_BLOCK as u64);
                2 * (elements + 4 * blocks)
            }
            // Factored second moment (row and column sums), no first moment (beta1 = None).
            Self::Adafactor => 4 * (rows + columns) as u64,
            Self::Prodigy => 4 * 4 * elements,
            Self::Lion => 4 * elements,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_sizes_follow_the_formulas() {
        assert_eq!(OptimizerKind::AdamW.state_bytes(4, 3072), 8 * 4 * 3072);
        // 12288 values: 48 blocks of 256, each with an f32 absmax, for each of two moments.
        assert_eq!(
            OptimizerKind::AdamW8bit.state_bytes(4, 3072),
            2 * (12288 + 48 * 4)
        );
        assert_eq!(OptimizerKind::Adafactor.state_bytes(4, 3072), 4 * 3076);
        assert_eq!(OptimizerKind::Prodigy.state_bytes(4, 3072), 16 * 12288);
        assert_eq!(OptimizerKind::Lion.state_bytes(4, 3072), 4 * 12288);
        assert_eq!(
            OptimizerKind::parse("bitsandbytes.optim.AdamW8bit").unwrap(),
            OptimizerKind::AdamW8bit
        );
        assert_eq!(
            OptimizerKind::parse("prodigyopt.Prodigy").unwrap(),
            OptimizerKind::Prodigy
        );
        assert!(OptimizerKind::parse("came_pytorch.CAME").is_err());
    }
}
