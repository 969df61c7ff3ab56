//! Whether the DiT's layers record gradients (as PyTorch's grad mode). Inference uses the fast
//! fused kernels, which record nothing; while a [`GradGuard`] lives, the same model code routes
//! every norm, RoPE, attention and linear through `nn::trainable`, whose ops have their own
//! backward, and frozen weights get no gradient.

use std::cell::Cell;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// True while a [`GradGuard`] is alive on this thread.
pub fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// Turns gradient recording on for this thread until dropped (restoring the previous mode).
pub struct GradGuard {
    previous: bool,
}

impl GradGuard {
    pub fn enable() -> Self {
        let previous = ENABLED.with(|e| e.replace(true));
        Self { previous }
    }
}

impl Drop for GradGuard {
    fn drop(&mut self) {
        let previous = self.previous;
        ENABLED.with(|e| e.set(previous));
    }
}
