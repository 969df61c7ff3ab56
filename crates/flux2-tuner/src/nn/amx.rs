//! bf16 matrix products on Intel AMX tiles (x86-64 Linux), the kernel of the bf16 inference path of
//! [`crate::nn::linear`] and [`crate::nn::attention`]. It is what oneDNN's `brg_matmul:amx` does for
//! PyTorch on the same CPUs: bf16 operands, f32 accumulation, one rounding of the result. candle
//! has no bf16 CPU matmul (it widens both operands to f32 on every call).
//!
//! `C = A B` with `A` `[m, k]` read in place (rows of unit stride) and `B` `[k, n]` repacked into
//! AMX's pair-interleaved layout ([`PackedB`]). Work is done in blocks of 32 rows of `A` times all
//! of `B`, two by two tiles of 16 x 16 f32 accumulators at a time.
//!
//! Set `FLUX2_NO_AMX=1` to turn the kernel off (then candle's matmuls are used).

use std::sync::OnceLock;

use half::bf16;

/// Rows of a tile and of a row block handled by one call of [`multiply_row_block`] (two tiles).
pub const BLOCK_ROWS: usize = 32;
/// bf16 values along `k` in one tile row.
pub const BLOCK_DEPTH: usize = 32;
/// f32 columns of an accumulator tile.
const TILE_COLUMNS: usize = 16;
/// Rows of every tile.
const TILE_ROWS: usize = 16;
/// u32 (bf16 pairs) in one packed `B` tile.
const TILE_PAIRS: usize = TILE_ROWS * TILE_COLUMNS;

/// True when the CPU has AMX-BF16 and the kernel let this process use the tile registers.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var_os("FLUX2_NO_AMX").is_none() && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    #[allow(unused_unsafe)]
    let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    // Linux hands out the 8 KiB tile state only on request: arch_prctl(ARCH_REQ_XCOMP_PERM,
    // XFEATURE_XTILEDATA). It fails (and we fall back) on kernels older than 5.16.
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let result: i64;
    // SAFETY: a plain syscall that only changes this process's permitted xsave features.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => result,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    result == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `B` `[k, n]` in AMX layout: tiles of 16 rows of 16 bf16 pairs `(B[2r, j], B[2r + 1, j])`, for
/// each 16-column strip (their number is even) the `k / 32` tiles one after the other. Zero padded
/// to whole tiles.
#[derive(Debug, Clone)]
pub struct PackedB {
    data: Vec<u32>,
    /// Tiles along `k` (`ceil(k / 32)`).
    pub depth_blocks: usize,
    /// 16-column strips (`2 ceil(n / 32)`).
    pub strips: usize,
}

impl PackedB {
    /// Packs the `[k, n]` matrix whose element `(i, j)` is `source[i * k_stride + j * n_stride]`.
    pub fn new(source: &[bf16], k: usize, n: usize, k_stride: usize, n_stride: usize) -> Self {
        let depth_blocks = k.div_ceil(BLOCK_DEPTH);
        let strips = 2 * n.div_ceil(2 * TILE_COLUMNS);
        let mut data = vec![0u32; strips * depth_blocks * TILE_PAIRS];
        let value = |i: usize, j: usize| -> u32 {
            if i < k {
                u32::from(source[i * k_stride + j * n_stride].to_bits())
            } else {
                0
            }
        };
        if k_stride == 1 && k % 2 == 0 {
            // Pairs along k are adjacent in memory (a `[n, k]` row-major source): no bounds test
            // per value.
            for (strip, tiles) in data.chunks_exact_mut(depth_blocks * TILE_PAIRS).enumerate() {
                let columns = n.saturating_sub(strip * TILE_COLUMNS).min(TILE_COLUMNS);
                for c in 0..columns {
                    let column = &source[(strip * TILE_COLUMNS + c) * n_stride..][..k];
                    for (pair_row, pair) in column.chunks_exact(2).enumerate() {
                        tiles[pair_row * TILE_COLUMNS + c] =
                            u32::from(pair[0].to_bits()) | (u32::from(pair[1].to_bits()) << 16);
                    }
                }
            }
            return Self {
                data,
                depth_blocks,
                strips,
            };
        }
        for (strip, tiles) in data.chunks_exact_mut(depth_blocks * TILE_PAIRS).enumerate() {
            let columns = n.saturating_sub(strip * TILE_COLUMNS).min(TILE_COLUMNS);
            for (pair_row, row) in tiles.chunks_exact_mut(TILE_COLUMNS).enumerate() {
                let i = 2 * pair_row;
                if i >= k {
                    break;
                }
                for (c, slot) in row.iter_mut().take(columns).enumerate() {
                    let j = strip * TILE_COLUMNS + c;
                    *slot = value(i, j) | (value(i + 1, j) << 16);
                }
            }
        }
        Self {
            data,
            depth_blocks,
            strips,
        }
    }

    /// Padded width, a multiple of 32.
    pub fn padded_columns(&self) -> usize {
        self.strips * TILE_COLUMNS
    }

    /// Padded depth, a multiple of 32: the row length `A` must have.
    pub fn padded_depth(&self) -> usize {
        self.depth_blocks * BLOCK_DEPTH
    }
}

/// AMX tile configuration (palette 1): every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    column_bytes: [u16; 16],
    rows: [u8; 16],
}

/// Loads the tile configuration on this thread and releases the tiles when dropped.
pub struct Tiles(());

impl Tiles {
    /// # Panics
    /// Never; returns `None` when [`available`] is false.
    pub fn configure() -> Option<Self> {
        if !available() {
            return None;
        }
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            column_bytes: [0; 16],
            rows: [0; 16],
        };
        for tile in 0..8 {
            config.column_bytes[tile] = 64;
            config.rows[tile] = TILE_ROWS as u8;
        }
        // SAFETY: AMX is present and permitted (checked by `available`); the config is valid.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack));
        }
        Some(Self(()))
    }

    /// `out[r * out_stride + c] = sum_i a[r * lda + i] * B[i, c]` for the 32 rows of `a` and
    /// every padded column of `b`.
    ///
    /// # Panics
    /// When `a` holds fewer than `31 * lda + b.padded_depth()` values or `out` fewer than
    /// `31 * out_stride + b.padded_columns()`.
    pub fn multiply_row_block(
        &self,
        a: &[bf16],
        lda: usize,
        b: &PackedB,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let depth = b.padded_depth();
        assert!(
            lda >= depth && a.len() >= (BLOCK_ROWS - 1) * lda + depth,
            "A block too short"
        );
        assert!(
            out_stride >= b.padded_columns()
                && out.len() >= (BLOCK_ROWS - 1) * out_stride + b.padded_columns(),
            "C block too short"
        );
        let a_top = a.as_ptr();
        // SAFETY: the second tile starts 16 rows down, inside `a` by the assertion above.
        let a_bottom = unsafe { a_top.add(TILE_ROWS * lda) };
        let a_stride = lda * 2;
        let c_stride = out_stride * 4;
        for pair in 0..b.strips / 2 {
            let left = &b.data[(2 * pair) * b.depth_blocks * TILE_PAIRS..];
            let right = &b.data[(2 * pair + 1) * b.depth_blocks * TILE_PAIRS..];
            let c_top = out[2 * pair * TILE_COLUMNS..].as_mut_ptr();
            // SAFETY: every load reads 16 rows of 64 bytes inside the slices checked above
            // (tile `d` of a strip starts at pair-row 16 d; A's columns 32 d .. 32 d + 32 < depth);
            // the stores write 16 rows of 16 f32 inside `out`. Tiles were configured by `configure`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let c_bottom = c_top.add(TILE_ROWS * out_stride);
                std::arch::asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack)
                );
                for d in 0..b.depth_blocks {
                    std::arch::asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a_top.add(d * BLOCK_DEPTH),
                        a1 = in(reg) a_bottom.add(d * BLOCK_DEPTH),
                        b0 = in(reg) left.as_ptr().add(d * TILE_PAIRS),
                        b1 = in(reg) right.as_ptr().add(d * TILE_PAIRS),
                        sa = in(reg) a_stride,
                        sb = in(reg) 64usize,
                        options(nostack, readonly),
                    );
                }
                std::arch::asm!(
                    "tilestored [{c0} + {sc}*1], tmm0",
                    "tilestored [{c1} + {sc}*1], tmm1",
                    "tilestored [{c2} + {sc}*1], tmm2",
                    "tilestored [{c3} + {sc}*1], tmm3",
                    c0 = in(reg) c_top,
                    c1 = in(reg) c_top.add(TILE_COLUMNS),
                    c2 = in(reg) c_bottom,
                    c3 = in(reg) c_bottom.add(TILE_COLUMNS),
                    sc = in(reg) c_stride,
                    options(nostack),
                );
            }
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured on this thread by `configure`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

/// `out = A B` for `A` `[rows, k]` (row-major, contiguous) and `B` packed `[k, n]`, each f32
/// result passed through `convert` (rounding to bf16, or none). Row blocks run in parallel.
/// Returns false, leaving `out` untouched, when AMX is unavailable.
///
/// # Panics
/// When `a` holds fewer than `rows * k` values or `out` fewer than `rows * n`.
pub fn multiply<T: Copy + Send>(
    a: &[bf16],
    rows: usize,
    k: usize,
    b: &PackedB,
    n: usize,
    out: &mut [T],
    convert: impl Fn(f32) -> T + Sync,
) -> bool {
    use rayon::prelude::*;
    if !available() || rows == 0 {
        return available();
    }
    assert!(
        a.len() >= rows * k && out.len() >= rows * n,
        "operands too short"
    );
    let depth = b.padded_depth();
    let width = b.padded_columns();
    out[..rows * n]
        .par_chunks_mut(BLOCK_ROWS * n)
        .enumerate()
        .for_each(|(block, out_rows)| {
            let Some(tiles) = Tiles::configure() else {
                return;
            };
            let first = block * BLOCK_ROWS;
            let count = (rows - first).min(BLOCK_ROWS);
            let a_rows = &a[first * k..];
            let padded;
            let (a_block, lda) = if count == BLOCK_ROWS && depth == k {
                (a_rows, k)
            } else {
                padded = padded_block(a_rows, count, k, k, depth);
                (padded.as_slice(), depth)
            };
            crate::nn::host::with_f32_scratch(BLOCK_ROWS * width, |block_out| {
                tiles.multiply_row_block(a_block, lda, b, block_out, width);
                crate::nn::host::vectorised(|| {
                    for (r, out_row) in out_rows.chunks_exact_mut(n).enumerate() {
                        let values = &block_out[r * width..r * width + n];
                        for (o, &v) in out_row.iter_mut().zip(values) {
                            *o = convert(v);
                        }
                    }
                });
            });
        });
    true
}

/// Copies `rows` rows of `width` values (row stride `stride`) into a zeroed `[32, padded_width]`
/// block, for row blocks that are short or whose width is not a multiple of 32.
pub fn padded_block(
    source: &[bf16],
    rows: usize,
    width: usize,
    stride: usize,
    padded_width: usize,
) -> Vec<bf16> {
    let mut block = vec![bf16::ZERO; BLOCK_ROWS * padded_width];
    for r in 0..rows.min(BLOCK_ROWS) {
        block[r * padded_width..r * padded_width + width]
            .copy_from_slice(&source[r * stride..r * stride + width]);
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SeededRng;

    /// A 32-row block of an odd-sized product against the f64 sum of the same bf16 values.
    #[test]
    fn row_block_matches_a_plain_product() {
        let Some(tiles) = Tiles::configure() else {
            // No AMX here: the callers use candle's matmul instead; check the packing alone.
            let b = PackedB::new(&[bf16::ONE; 6], 3, 2, 2, 1);
            assert_eq!((b.depth_blocks, b.strips), (1, 2));
            return;
        };
        let (m, k, n) = (32, 70, 45);
        let mut rng = SeededRng::new(7);
        let a: Vec<bf16> = (0..m * k).map(|_| bf16::from_f64(rng.normal())).collect();
        let b: Vec<bf16> = (0..k * n).map(|_| bf16::from_f64(rng.normal())).collect();
        // B stored transposed ([n, k]) to exercise the strides.
        let packed = PackedB::new(&b, k, n, 1, k);
        let a_block = padded_block(&a, m, k, k, packed.padded_depth());
        let mut out = vec![0f32; BLOCK_ROWS * packed.padded_columns()];
        tiles.multiply_row_block(
            &a_block,
            packed.padded_depth(),
            &packed,
            &mut out,
            packed.padded_columns(),
        );
        for r in 0..m {
            for c in 0..n {
                let exact: f64 = (0..k)
                    .map(|i| a[r * k + i].to_f64() * b[c * k + i].to_f64())
                    .sum();
                let got = out[r * packed.padded_columns() + c] as f64;
                assert!(
                    (got - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                    "({r}, {c}): {got} vs {exact}"
                );
            }
        }
    }
}
