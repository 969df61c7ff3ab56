//! bf16 matrix products on Intel AMX tiles (x86-64 Linux), the kernel of the bf16 inference path of
//! [`crate::nn::linear`] and [`crate::nn::attention`]. It is what oneDNN's `brg_matmul:amx` does for
//! PyTorch on the same CPUs: bf16 operands, f32 accumulation, one rounding of the result. candle
//! has no bf16 CPU matmul (it widens both operands to f32 on every call).
//!
//! `C = A B` with `B` `[k, n]` repacked into AMX's pair-interleaved layout ([`PackedB`]) and the
//! rows of `A` `[m, k]` copied into tile order per task (both cache-line aligned: see
//! [`crate::nn::amx_layout`]). Work is done in blocks of 32 rows of `A` times 32 columns of `B`,
//! two by two tiles of 16 x 16 f32 accumulators; [`multiply`] walks `B` in panels that stay in the
//! L2 cache while all row blocks of a task pass them.
//!
//! Set `FLUX2_NO_AMX=1` to turn the kernel off (then candle's matmuls are used).

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use crate::nn::amx_layout::{
    pack_rows, row_block_words, AlignedWords, TILE_COLUMNS, TILE_DEPTH, TILE_ROWS, TILE_WORDS,
};
pub use crate::nn::amx_layout::{PackedB, BLOCK_ROWS};
use crate::nn::host::vectorised;

/// bf16 values along `k` in one tile row.
pub const BLOCK_DEPTH: usize = TILE_DEPTH;
/// Columns of one block of results: two tiles side by side.
pub const BLOCK_COLUMNS: usize = 2 * TILE_COLUMNS;
/// Bytes of `B` walked against every row block before moving on (a panel of column pairs that
/// stays in the L2 cache while the row blocks stream past it).
const PANEL_BYTES: usize = 512 * 1024;
/// Parallel tasks per thread in [`multiply`] (some slack for a busy machine).
const TASKS_PER_THREAD: usize = 2;
/// Most row blocks in one task: bounds the packed rows each thread keeps as scratch (256 rows of
/// `A`) while a panel of `B` is still reused by 8 row blocks.
const MAX_TASK_BLOCKS: usize = 8;

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

    /// The 32 x 32 block `A B[.., 32 pair .. 32 pair + 32]` into `out` (`[32, 32]` f32, aligned).
    ///
    /// # Safety
    /// `rows` is one packed row block of `b.depth_blocks` depth blocks ([`pack_rows`]), cache-line
    /// aligned; `pair < b.strips / 2`; `out` points to 1024 writable, 64-byte aligned f32.
    #[inline(always)]
    unsafe fn block_product(&self, rows: &[u32], b: &PackedB, pair: usize, out: *mut f32) {
        // SAFETY: as documented above; a row stride of 32 f32 is the `[32, 32]` block.
        unsafe { self.block_product_strided(rows, b, pair, out, BLOCK_COLUMNS) }
    }

    /// As [`Self::block_product`], with rows of `out` `stride` f32 apart.
    ///
    /// # Safety
    /// As for [`Self::block_product`], with `out` holding `31 * stride + 32` writable f32.
    #[inline(always)]
    unsafe fn block_product_strided(
        &self,
        rows: &[u32],
        b: &PackedB,
        pair: usize,
        out: *mut f32,
        stride: usize,
    ) {
        let (left, right) = (b.strip(2 * pair).as_ptr(), b.strip(2 * pair + 1).as_ptr());
        let a = rows.as_ptr();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every load reads one 1 KiB tile inside `rows` or a strip of `b` (tile `d` of a
        // strip at word 256 d, the top and bottom tiles of depth block `d` at words 512 d and
        // 512 d + 256 of `rows`); the stores write the four 16 x 16 quarters of the 32 x 32
        // block at `out` (row stride `stride` f32). Tiles were configured by `configure`.
        unsafe {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for d in 0..b.depth_blocks {
                std::arch::asm!(
                    "tileloadd tmm4, [{a} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm5, [{a} + {s}*1 + 1024]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a = in(reg) a.add(d * 2 * TILE_WORDS),
                    b0 = in(reg) left.add(d * TILE_WORDS),
                    b1 = in(reg) right.add(d * TILE_WORDS),
                    s = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
            std::arch::asm!(
                "tilestored [{c} + {s}*1], tmm0",
                "tilestored [{c} + {s}*1 + 64], tmm1",
                "tilestored [{d} + {s}*1], tmm2",
                "tilestored [{d} + {s}*1 + 64], tmm3",
                c = in(reg) out,
                d = in(reg) out.add(TILE_ROWS * stride),
                s = in(reg) stride * 4,
                options(nostack),
            );
        }
    }

    /// For one packed row block `rows` ([`pack_rows`] with `b.depth_blocks`), calls
    /// `sink(first_column, block)` with each 32 x 32 block of results (`block[r * 32 + c]` is
    /// `C[r, first_column + c]`; columns past `B`'s width are zero), computed in `scratch`.
    ///
    /// # Panics
    /// When `rows` is shorter than one packed row block.
    #[inline(always)]
    pub fn row_block_products(
        &self,
        rows: &[u32],
        b: &PackedB,
        scratch: &mut ResultBlock,
        sink: impl FnMut(usize, &[f32]),
    ) {
        self.pair_products(rows, b, 0..b.strips / 2, scratch, sink);
    }

    /// As [`Self::row_block_products`] for the column pairs `pairs` only. The results of a pair
    /// are handed to `sink` only after the next pair's products are issued: reading a tile store
    /// right after it is written stalls until the whole product has drained from the tile unit,
    /// which cost more than the products themselves for short depths (attention scores).
    #[inline(always)]
    fn pair_products(
        &self,
        rows: &[u32],
        b: &PackedB,
        pairs: std::ops::Range<usize>,
        scratch: &mut ResultBlock,
        mut sink: impl FnMut(usize, &[f32]),
    ) {
        assert!(
            rows.len() >= row_block_words(b.depth_blocks) && pairs.end <= b.strips / 2,
            "packed row block too short or columns out of range"
        );
        let (even, odd) = scratch
            .0
            .as_f32_mut()
            .split_at_mut(BLOCK_ROWS * BLOCK_COLUMNS);
        let mut previous: Option<usize> = None;
        for pair in pairs {
            let (current, other) = if pair % 2 == 0 {
                (&mut *even, &*odd)
            } else {
                (&mut *odd, &*even)
            };
            // SAFETY: the block and the pair range are checked above; `current` is 64-byte
            // aligned (the second half starts 4 KiB in) and holds 1024 f32.
            unsafe { self.block_product(rows, b, pair, current.as_mut_ptr()) };
            if let Some(done) = previous {
                sink(done * BLOCK_COLUMNS, other);
            }
            previous = Some(pair);
        }
        if let Some(done) = previous {
            let last = if done % 2 == 0 { &*even } else { &*odd };
            sink(done * BLOCK_COLUMNS, last);
        }
    }

    /// Writes the products of one packed row block `rows` with every padded column of `b` into
    /// `out` (row `r` at `out[r * stride..]`), straight from the tiles.
    ///
    /// # Panics
    /// When `rows` is shorter than one packed row block or `out` than
    /// `31 * stride + b.padded_columns()`, or `stride < b.padded_columns()`.
    #[inline(always)]
    pub fn row_block_into(&self, rows: &[u32], b: &PackedB, out: &mut [f32], stride: usize) {
        let width = b.padded_columns();
        assert!(
            rows.len() >= row_block_words(b.depth_blocks)
                && stride >= width
                && out.len() >= (BLOCK_ROWS - 1) * stride + width,
            "row block or result too short"
        );
        for pair in 0..b.strips / 2 {
            // SAFETY: checked above: the 32 x 32 block at column 32 pair lies inside `out`.
            unsafe {
                self.block_product_strided(
                    rows,
                    b,
                    pair,
                    out.as_mut_ptr().add(pair * BLOCK_COLUMNS),
                    stride,
                )
            };
        }
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
        with_packed_rows(row_block_words(b.depth_blocks), |packed| {
            pack_rows(
                a,
                BLOCK_ROWS,
                depth,
                lda,
                b.depth_blocks,
                packed.as_bf16_mut(),
            );
            let mut scratch = ResultBlock::new();
            self.row_block_products(packed.as_slice(), b, &mut scratch, |column, block| {
                for (r, values) in block.chunks_exact(BLOCK_COLUMNS).enumerate() {
                    out[r * out_stride + column..][..BLOCK_COLUMNS].copy_from_slice(values);
                }
            });
        });
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

/// Aligned scratch for two 32 x 32 blocks of f32 results (one being written by the tiles while
/// the other is read).
pub struct ResultBlock(AlignedWords);

impl ResultBlock {
    pub fn new() -> Self {
        Self(AlignedWords::zeroed(2 * BLOCK_ROWS * BLOCK_COLUMNS))
    }
}

impl Default for ResultBlock {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    /// Packed rows of `A` for the running task, kept between calls.
    static PACKED_ROWS: RefCell<AlignedWords> = RefCell::new(AlignedWords::default());
    /// The result blocks of the running task.
    static RESULT_BLOCK: RefCell<ResultBlock> = RefCell::new(ResultBlock::new());
}

/// Calls `f` with this thread's aligned scratch for `words` words of packed rows (stale contents).
fn with_packed_rows<R>(words: usize, f: impl FnOnce(&mut AlignedWords) -> R) -> R {
    PACKED_ROWS.with(|cell| {
        let mut scratch = cell.borrow_mut();
        scratch.resize(words);
        f(&mut scratch)
    })
}

/// Calls `f` with this thread's result blocks.
fn with_result_block<R>(f: impl FnOnce(&mut ResultBlock) -> R) -> R {
    RESULT_BLOCK.with(|cell| f(&mut cell.borrow_mut()))
}

/// `out = A B` for `A` `[rows, k]` (row-major, contiguous) and `B` packed `[k, n]`, each f32
/// result passed through `convert` (rounding to bf16, or none). Tasks of whole row blocks run in
/// parallel; each packs its rows of `A` once, then walks panels of `B` (each cached while all its
/// row blocks pass). Returns false, leaving `out` untouched, when AMX is unavailable.
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
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, and `multiply_into` only ever stores initialised
    // `T` values through the view, so `out` stays initialised.
    let slots = unsafe {
        std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<MaybeUninit<T>>(), out.len())
    };
    multiply_into(a, rows, k, b, n, slots, convert)
}

/// `A B` as a new `[rows, n]` vector (see [`multiply`]), written once: no zero fill first.
/// `None` when AMX is unavailable.
pub fn product<T: Copy + Send>(
    a: &[bf16],
    rows: usize,
    k: usize,
    b: &PackedB,
    n: usize,
    convert: impl Fn(f32) -> T + Sync,
) -> Option<Vec<T>> {
    let length = rows * n;
    let mut out = Vec::with_capacity(length);
    if !multiply_into(
        a,
        rows,
        k,
        b,
        n,
        &mut out.spare_capacity_mut()[..length],
        convert,
    ) {
        return None;
    }
    // SAFETY: `multiply_into` returned true, so it wrote all `rows * n` values.
    unsafe { out.set_len(length) };
    Some(out)
}

/// [`multiply`] into slots that may be uninitialised: every one of `out[..rows * n]` is written
/// when it returns true.
fn multiply_into<T: Copy + Send>(
    a: &[bf16],
    rows: usize,
    k: usize,
    b: &PackedB,
    n: usize,
    out: &mut [MaybeUninit<T>],
    convert: impl Fn(f32) -> T + Sync,
) -> bool {
    if !available() || rows == 0 || n == 0 {
        return available();
    }
    assert!(
        a.len() >= rows * k && out.len() >= rows * n,
        "operands too short"
    );
    assert!(
        b.padded_depth() >= k && b.padded_columns() >= n,
        "packed B smaller than k x n"
    );
    let row_blocks = rows.div_ceil(BLOCK_ROWS);
    let tasks = (rayon::current_num_threads() * TASKS_PER_THREAD).clamp(1, row_blocks);
    let task_rows = row_blocks.div_ceil(tasks).min(MAX_TASK_BLOCKS) * BLOCK_ROWS;
    let pairs = n.div_ceil(BLOCK_COLUMNS);
    let pair_bytes = b.depth_blocks * 2 * TILE_WORDS * 4;
    let panel_pairs = (PANEL_BYTES / pair_bytes).max(1);
    let block_words = row_block_words(b.depth_blocks);
    out[..rows * n]
        .par_chunks_mut(task_rows * n)
        .enumerate()
        .for_each(|(task, out_rows)| {
            let Some(tiles) = Tiles::configure() else {
                return;
            };
            let first = task * task_rows;
            let count = out_rows.len() / n;
            let blocks = count.div_ceil(BLOCK_ROWS);
            with_packed_rows(blocks * block_words, |packed| {
                pack_rows(
                    &a[first * k..],
                    count,
                    k,
                    k,
                    b.depth_blocks,
                    packed.as_bf16_mut(),
                );
                let packed = packed.as_slice();
                with_result_block(|scratch| {
                    vectorised(
                        #[inline(always)]
                        || {
                            for panel in (0..pairs).step_by(panel_pairs) {
                                let panel = panel..(panel + panel_pairs).min(pairs);
                                for row_block in 0..blocks {
                                    let block_rows = &packed[row_block * block_words..];
                                    let first_row = row_block * BLOCK_ROWS;
                                    let valid_rows = (count - first_row).min(BLOCK_ROWS);
                                    tiles.pair_products(
                                        block_rows,
                                        b,
                                        panel.clone(),
                                        scratch,
                                        #[inline(always)]
                                        |column, block| {
                                            let width = (n - column).min(BLOCK_COLUMNS);
                                            for r in 0..valid_rows {
                                                let target = &mut out_rows
                                                    [(first_row + r) * n + column..][..width];
                                                let values = &block[r * BLOCK_COLUMNS..][..width];
                                                for (o, &v) in target.iter_mut().zip(values) {
                                                    o.write(convert(v));
                                                }
                                            }
                                        },
                                    );
                                }
                            }
                        },
                    )
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
    let mut block = crate::nn::fused::zeroed_bf16(BLOCK_ROWS * padded_width);
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

    fn random_bf16(count: usize, seed: u64) -> Vec<bf16> {
        let mut rng = SeededRng::new(seed);
        (0..count).map(|_| bf16::from_f64(rng.normal())).collect()
    }

    /// `multiply` against f64 sums of the same bf16 values, for sizes that are not multiples of
    /// the tiles (partial row blocks, columns and depth), several tasks and several panels of `B`,
    /// with `B` given as `[n, k]` rows (the transposing packer) and as `[k, n]` (the strided one).
    #[test]
    fn multiply_matches_a_plain_product() {
        if !available() {
            return;
        }
        for (case, &(m, k, n)) in [
            (1, 2, 1),
            (45, 70, 45),
            (100, 96, 1000),
            (70, 2054, 40),
            (33, 3, 17),
        ]
        .iter()
        .enumerate()
        {
            let a = random_bf16(m * k, 10 + case as u64);
            let b_rows = random_bf16(n * k, 20 + case as u64); // `[n, k]`: B[i, j] = b_rows[j k + i]
            let b_plain: Vec<bf16> = (0..k * n).map(|x| b_rows[(x % n) * k + x / n]).collect();
            for packed in [
                PackedB::new(&b_rows, k, n, 1, k),
                PackedB::new(&b_plain, k, n, n, 1),
            ] {
                let mut out = vec![f32::NAN; m * n];
                assert!(multiply(&a, m, k, &packed, n, &mut out, |v| v));
                let mut rounded = vec![bf16::ZERO; m * n];
                multiply(
                    &a,
                    m,
                    k,
                    &packed,
                    n,
                    &mut rounded,
                    crate::nn::fused::round_to_bf16,
                );
                for r in 0..m {
                    for c in 0..n {
                        let terms =
                            (0..k).map(|i| a[r * k + i].to_f64() * b_rows[c * k + i].to_f64());
                        let exact: f64 = terms.clone().sum();
                        let magnitude: f64 = terms.map(f64::abs).sum();
                        let got = f64::from(out[r * n + c]);
                        assert!(
                            (got - exact).abs() <= 1e-5 * magnitude + 1e-6,
                            "{m}x{k}x{n} ({r}, {c}): {got} vs {exact}"
                        );
                        assert_eq!(rounded[r * n + c], bf16::from_f32(out[r * n + c]));
                    }
                }
            }
        }
    }

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
