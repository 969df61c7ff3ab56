//! Musubi's block-swap side flags, which this build cannot honour (see the module doc of
//! [`crate::offload`]).

use crate::error::{Error, Result};

/// Refuses `--use_pinned_memory_for_block_swap` and `--block_swap_h2d_only` with the reason.
pub fn refuse_block_swap_variants(use_pinned_memory: bool, h2d_only: bool) -> Result<()> {
    if use_pinned_memory {
        return Err(Error::InvalidArgument {
            name: "--use_pinned_memory_for_block_swap".into(),
            message: "candle 0.11.1 exposes no pinned host allocation; block swap copies from \
                      pageable host memory. Remove the flag"
                .into(),
        });
    }
    if h2d_only {
        return Err(Error::InvalidArgument {
            name: "--block_swap_h2d_only".into(),
            message: "Musubi's CUDA-only streaming offloader (evenly spaced blocks, a ring of \
                      device buffers) is not implemented; --blocks_to_swap already copies host to \
                      device only (device copies are dropped, never copied back). Remove the flag"
                .into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_flag() {
        assert!(refuse_block_swap_variants(false, false).is_ok());
        let pinned = refuse_block_swap_variants(true, false)
            .unwrap_err()
            .to_string();
        assert!(
            pinned.contains("--use_pinned_memory_for_block_swap"),
            "{pinned}"
        );
        let h2d = refuse_block_swap_variants(false, true)
            .unwrap_err()
            .to_string();
        assert!(h2d.contains("--block_swap_h2d_only"), "{h2d}");
    }
}
