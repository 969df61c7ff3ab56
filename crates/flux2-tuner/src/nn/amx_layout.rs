//! Memory layouts of the AMX operands ([`crate::nn::amx`]): cache-line aligned storage, the right
//! operand `B` in pair-interleaved tiles ([`PackedB`]) and blocks of left-operand rows in tile
//! order ([`pack_rows`]).
//!
//! Alignment matters: a tile row is 64 bytes, and one that straddles two cache lines costs two
//! loads (unaligned tiles halved the kernel's speed).

use half::bf16;

use crate::nn::host::vectorised;

/// Rows of a tile.
pub const TILE_ROWS: usize = 16;
/// u32 words (f32 values, or bf16 pairs) in one tile row.
pub const TILE_COLUMNS: usize = 16;
/// u32 words in one tile.
pub const TILE_WORDS: usize = TILE_ROWS * TILE_COLUMNS;
/// bf16 values along `k` in one tile row.
pub const TILE_DEPTH: usize = 2 * TILE_COLUMNS;
/// Rows of a row block: two tiles.
pub const BLOCK_ROWS: usize = 2 * TILE_ROWS;

/// One 64-byte cache line of u32 words: the unit of [`AlignedWords`].
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([u32; 16]);

/// u32 words in cache-line aligned storage.
#[derive(Debug, Clone, Default)]
pub struct AlignedWords {
    lines: Vec<CacheLine>,
    length: usize,
}

impl AlignedWords {
    /// `length` zero words.
    pub fn zeroed(length: usize) -> Self {
        Self {
            lines: crate::nn::host::filled(length.div_ceil(16), CacheLine([0; 16])),
            length,
        }
    }

    /// `length` words in parts of `part_words` (a multiple of 16), each part zeroed and then
    /// passed with its index to `fill`, by the thread pool. A part is zeroed by the core that fills
    /// it, while its lines are in cache, instead of in a separate pass over the whole buffer first
    /// (that pass was 2 % of a bf16 DiT forward).
    pub fn filled_in_parts(
        length: usize,
        part_words: usize,
        fill: impl Fn(usize, &mut [u32]) + Sync,
    ) -> Self {
        if length == 0 {
            return Self::default();
        }
        assert!(
            part_words > 0 && part_words % 16 == 0,
            "parts must be whole cache lines"
        );
        let lines = crate::nn::host::written_in_parts(
            length.div_ceil(16),
            part_words / 16,
            CacheLine([0; 16]),
            |index, lines| {
                // SAFETY: a line is 16 u32 words (`repr(C)`), all initialised.
                let words = unsafe {
                    std::slice::from_raw_parts_mut(
                        lines.as_mut_ptr().cast::<u32>(),
                        16 * lines.len(),
                    )
                };
                let valid = (length - index * part_words).min(words.len());
                fill(index, &mut words[..valid]);
            },
        );
        Self { lines, length }
    }

    /// Makes room for `length` words, keeping the allocation when it is large enough (the contents
    /// are then stale: callers overwrite every word they read).
    pub fn resize(&mut self, length: usize) {
        let lines = length.div_ceil(16);
        if self.lines.len() < lines {
            self.lines.resize(lines, CacheLine([0; 16]));
        }
        self.length = length;
    }

    pub fn as_slice(&self) -> &[u32] {
        // SAFETY: `lines` holds at least `length` u32 values, contiguous and initialised.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u32>(), self.length) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u32] {
        // SAFETY: as in `as_slice`, borrowed mutably.
        unsafe {
            std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u32>(), self.length)
        }
    }

    /// The words as `2 * length` bf16 values (two per word, the first in the low half).
    pub fn as_bf16_mut(&mut self) -> &mut [bf16] {
        // SAFETY: bf16 is a 2-byte plain value type; x86-64 is little-endian, so value `2 i` is the
        // low half of word `i`, as the tile instructions read it.
        unsafe {
            std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<bf16>(), 2 * self.length)
        }
    }

    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        // SAFETY: f32 and u32 have the same size and alignment; every bit pattern is a valid f32.
        unsafe {
            std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.length)
        }
    }
}

/// `B` `[k, n]` in AMX layout: tiles of 16 rows of 16 bf16 pairs `(B[2r, j], B[2r + 1, j])`, for
/// each 16-column strip (their number is even) the `k / 32` tiles one after the other. Zero padded
/// to whole tiles.
#[derive(Debug, Clone)]
pub struct PackedB {
    data: AlignedWords,
    /// Tiles along `k` (`ceil(k / 32)`).
    pub depth_blocks: usize,
    /// 16-column strips (`2 ceil(n / 32)`).
    pub strips: usize,
}

/// Reads the bf16 pair `(values[0], values[1])` as one tile word.
#[inline(always)]
fn pair_word(values: &[bf16]) -> u32 {
    u32::from(values[0].to_bits()) | (u32::from(values[1].to_bits()) << 16)
}

impl PackedB {
    /// Packs the `[k, n]` matrix whose element `(i, j)` is `source[i * k_stride + j * n_stride]`.
    /// Strips are packed in parallel.
    pub fn new(source: &[bf16], k: usize, n: usize, k_stride: usize, n_stride: usize) -> Self {
        let depth_blocks = k.div_ceil(TILE_DEPTH);
        let strips = 2 * n.div_ceil(2 * TILE_COLUMNS);
        let strip_words = depth_blocks * TILE_WORDS;
        let data =
            AlignedWords::filled_in_parts(strips * strip_words, strip_words, |strip, tiles| {
                let first = strip * TILE_COLUMNS;
                let columns = n.saturating_sub(first).min(TILE_COLUMNS);
                if columns == 0 {
                    return;
                }
                if k_stride == 1 && k % 2 == 0 {
                    // A `[n, k]` row-major source: pairs along k are adjacent.
                    vectorised(
                        #[inline(always)]
                        || pack_transposed_strip(source, k, first, columns, n_stride, tiles),
                    );
                } else if n_stride == 1 {
                    // A `[k, n]` row-major source: each tile row interleaves two source rows.
                    vectorised(
                        #[inline(always)]
                        || pack_row_pairs_strip(source, k, first, columns, k_stride, tiles),
                    );
                } else {
                    pack_strided_strip(source, k, first, columns, k_stride, n_stride, tiles);
                }
            });
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
        self.depth_blocks * TILE_DEPTH
    }

    /// The tiles of strip `strip`, `depth_blocks` of them one after the other.
    pub fn strip(&self, strip: usize) -> &[u32] {
        let words = self.depth_blocks * TILE_WORDS;
        &self.data.as_slice()[strip * words..(strip + 1) * words]
    }
}

/// One strip of a `[n, k]` row-major source (column `j` of `B` is source row `j`): per tile a
/// 16 x 16 transpose of words, read from 16 source rows and written to one contiguous tile.
#[inline(always)]
fn pack_transposed_strip(
    source: &[bf16],
    k: usize,
    first: usize,
    columns: usize,
    n_stride: usize,
    tiles: &mut [u32],
) {
    let pairs = k / 2;
    #[cfg(target_arch = "x86_64")]
    let shuffles = std::arch::is_x86_feature_detected!("avx512f");
    for (block, tile) in tiles.chunks_exact_mut(TILE_WORDS).enumerate() {
        let first_pair = block * TILE_COLUMNS;
        let count = pairs.saturating_sub(first_pair).min(TILE_COLUMNS);
        #[cfg(target_arch = "x86_64")]
        if shuffles && columns == TILE_COLUMNS && count == TILE_COLUMNS {
            // Bounds of the last row read (the others lie between it and the first).
            let start = first * n_stride + 2 * first_pair;
            let _ =
                &source[start..(first + TILE_COLUMNS - 1) * n_stride + 2 * first_pair + TILE_DEPTH];
            // SAFETY: AVX-512F was detected; rows `first .. first + 16` hold 32 values from
            // `2 first_pair` on (checked above); tiles are aligned 1 KiB chunks of `AlignedWords`.
            unsafe { transpose_tile(source[start..].as_ptr(), 2 * n_stride, tile.as_mut_ptr()) };
            continue;
        }
        let mut words = [[0u32; TILE_COLUMNS]; TILE_COLUMNS];
        for (c, column) in words.iter_mut().enumerate().take(columns) {
            let row = &source[(first + c) * n_stride + 2 * first_pair..][..2 * count];
            for (word, pair) in column.iter_mut().zip(row.chunks_exact(2)) {
                *word = pair_word(pair);
            }
        }
        for (p, tile_row) in tile.chunks_exact_mut(TILE_COLUMNS).enumerate() {
            for (c, slot) in tile_row.iter_mut().enumerate() {
                *slot = words[c][p];
            }
        }
    }
}

/// Writes the 16 x 16 transpose of a block of words: word `c` of tile row `p` is word `p` of source
/// row `c` (source rows `stride_bytes` apart). Three rounds of AVX-512 shuffles (dwords, qwords,
/// 128-bit lanes twice) instead of 256 scalar moves.
///
/// # Safety
/// AVX-512F is present; 16 source rows of 64 readable bytes start at `source`, `stride_bytes`
/// apart; `tile` is 64-byte aligned with 1 KiB writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_tile(source: *const bf16, stride_bytes: usize, tile: *mut u32) {
    // SAFETY: the loads and stores stay inside the rows and the tile described above.
    unsafe {
        std::arch::asm!(
            "vmovdqu32 zmm0, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm1, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm2, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm3, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm4, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm5, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm6, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm7, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm8, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm9, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm10, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm11, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm12, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm13, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm14, [{source}]",
            "add {source}, {stride}",
            "vmovdqu32 zmm15, [{source}]",
            "vpunpckldq zmm16, zmm0, zmm1",
            "vpunpckhdq zmm17, zmm0, zmm1",
            "vpunpckldq zmm18, zmm2, zmm3",
            "vpunpckhdq zmm19, zmm2, zmm3",
            "vpunpckldq zmm20, zmm4, zmm5",
            "vpunpckhdq zmm21, zmm4, zmm5",
            "vpunpckldq zmm22, zmm6, zmm7",
            "vpunpckhdq zmm23, zmm6, zmm7",
            "vpunpckldq zmm24, zmm8, zmm9",
            "vpunpckhdq zmm25, zmm8, zmm9",
            "vpunpckldq zmm26, zmm10, zmm11",
            "vpunpckhdq zmm27, zmm10, zmm11",
            "vpunpckldq zmm28, zmm12, zmm13",
            "vpunpckhdq zmm29, zmm12, zmm13",
            "vpunpckldq zmm30, zmm14, zmm15",
            "vpunpckhdq zmm31, zmm14, zmm15",
            "vpunpcklqdq zmm0, zmm16, zmm18",
            "vpunpckhqdq zmm1, zmm16, zmm18",
            "vpunpcklqdq zmm2, zmm17, zmm19",
            "vpunpckhqdq zmm3, zmm17, zmm19",
            "vpunpcklqdq zmm4, zmm20, zmm22",
            "vpunpckhqdq zmm5, zmm20, zmm22",
            "vpunpcklqdq zmm6, zmm21, zmm23",
            "vpunpckhqdq zmm7, zmm21, zmm23",
            "vpunpcklqdq zmm8, zmm24, zmm26",
            "vpunpckhqdq zmm9, zmm24, zmm26",
            "vpunpcklqdq zmm10, zmm25, zmm27",
            "vpunpckhqdq zmm11, zmm25, zmm27",
            "vpunpcklqdq zmm12, zmm28, zmm30",
            "vpunpckhqdq zmm13, zmm28, zmm30",
            "vpunpcklqdq zmm14, zmm29, zmm31",
            "vpunpckhqdq zmm15, zmm29, zmm31",
            "vshufi32x4 zmm16, zmm0, zmm4, 0x44",
            "vshufi32x4 zmm17, zmm0, zmm4, 0xEE",
            "vshufi32x4 zmm18, zmm8, zmm12, 0x44",
            "vshufi32x4 zmm19, zmm8, zmm12, 0xEE",
            "vshufi32x4 zmm20, zmm1, zmm5, 0x44",
            "vshufi32x4 zmm21, zmm1, zmm5, 0xEE",
            "vshufi32x4 zmm22, zmm9, zmm13, 0x44",
            "vshufi32x4 zmm23, zmm9, zmm13, 0xEE",
            "vshufi32x4 zmm24, zmm2, zmm6, 0x44",
            "vshufi32x4 zmm25, zmm2, zmm6, 0xEE",
            "vshufi32x4 zmm26, zmm10, zmm14, 0x44",
            "vshufi32x4 zmm27, zmm10, zmm14, 0xEE",
            "vshufi32x4 zmm28, zmm3, zmm7, 0x44",
            "vshufi32x4 zmm29, zmm3, zmm7, 0xEE",
            "vshufi32x4 zmm30, zmm11, zmm15, 0x44",
            "vshufi32x4 zmm31, zmm11, zmm15, 0xEE",
            "vshufi32x4 zmm0, zmm16, zmm18, 0x88",
            "vshufi32x4 zmm4, zmm16, zmm18, 0xDD",
            "vshufi32x4 zmm8, zmm17, zmm19, 0x88",
            "vshufi32x4 zmm12, zmm17, zmm19, 0xDD",
            "vshufi32x4 zmm1, zmm20, zmm22, 0x88",
            "vshufi32x4 zmm5, zmm20, zmm22, 0xDD",
            "vshufi32x4 zmm9, zmm21, zmm23, 0x88",
            "vshufi32x4 zmm13, zmm21, zmm23, 0xDD",
            "vshufi32x4 zmm2, zmm24, zmm26, 0x88",
            "vshufi32x4 zmm6, zmm24, zmm26, 0xDD",
            "vshufi32x4 zmm10, zmm25, zmm27, 0x88",
            "vshufi32x4 zmm14, zmm25, zmm27, 0xDD",
            "vshufi32x4 zmm3, zmm28, zmm30, 0x88",
            "vshufi32x4 zmm7, zmm28, zmm30, 0xDD",
            "vshufi32x4 zmm11, zmm29, zmm31, 0x88",
            "vshufi32x4 zmm15, zmm29, zmm31, 0xDD",
            "vmovdqa32 [{tile} + 0], zmm0",
            "vmovdqa32 [{tile} + 64], zmm1",
            "vmovdqa32 [{tile} + 128], zmm2",
            "vmovdqa32 [{tile} + 192], zmm3",
            "vmovdqa32 [{tile} + 256], zmm4",
            "vmovdqa32 [{tile} + 320], zmm5",
            "vmovdqa32 [{tile} + 384], zmm6",
            "vmovdqa32 [{tile} + 448], zmm7",
            "vmovdqa32 [{tile} + 512], zmm8",
            "vmovdqa32 [{tile} + 576], zmm9",
            "vmovdqa32 [{tile} + 640], zmm10",
            "vmovdqa32 [{tile} + 704], zmm11",
            "vmovdqa32 [{tile} + 768], zmm12",
            "vmovdqa32 [{tile} + 832], zmm13",
            "vmovdqa32 [{tile} + 896], zmm14",
            "vmovdqa32 [{tile} + 960], zmm15",
            source = inout(reg) source => _,
            stride = in(reg) stride_bytes,
            tile = in(reg) tile,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _, out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _, out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _, out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            options(nostack),
        );
    }
}

/// One strip of a `[k, n]` source with unit column stride: tile row `p` interleaves the column
/// segments of source rows `2p` and `2p + 1` (zero past `k`).
#[inline(always)]
fn pack_row_pairs_strip(
    source: &[bf16],
    k: usize,
    first: usize,
    columns: usize,
    k_stride: usize,
    tiles: &mut [u32],
) {
    for (pair_row, row) in tiles.chunks_exact_mut(TILE_COLUMNS).enumerate() {
        let i = 2 * pair_row;
        if i >= k {
            break;
        }
        let upper = &source[i * k_stride + first..][..columns];
        if i + 1 < k {
            let lower = &source[(i + 1) * k_stride + first..][..columns];
            for ((slot, a), b) in row.iter_mut().zip(upper).zip(lower) {
                *slot = u32::from(a.to_bits()) | (u32::from(b.to_bits()) << 16);
            }
        } else {
            for (slot, a) in row.iter_mut().zip(upper) {
                *slot = u32::from(a.to_bits());
            }
        }
    }
}

/// One strip of any strided source, value by value (zero past `k`).
fn pack_strided_strip(
    source: &[bf16],
    k: usize,
    first: usize,
    columns: usize,
    k_stride: usize,
    n_stride: usize,
    tiles: &mut [u32],
) {
    let value = |i: usize, j: usize| -> u32 {
        if i < k {
            u32::from(source[i * k_stride + j * n_stride].to_bits())
        } else {
            0
        }
    };
    for (pair_row, row) in tiles.chunks_exact_mut(TILE_COLUMNS).enumerate() {
        let i = 2 * pair_row;
        if i >= k {
            break;
        }
        for (c, slot) in row.iter_mut().take(columns).enumerate() {
            let j = first + c;
            *slot = value(i, j) | (value(i + 1, j) << 16);
        }
    }
}

/// Words of one packed row block of depth `depth_blocks` (two tiles per depth block).
pub fn row_block_words(depth_blocks: usize) -> usize {
    depth_blocks * 2 * TILE_WORDS
}

/// Packs `rows` rows of `A` (`k` values each, row stride `lda`) into `out` in tile order: per block
/// of 32 rows, per depth block, the top and the bottom tile (16 rows of 32 values) one after the
/// other. Rows past `rows` and values past `k` are zero. `out` holds whole row blocks.
pub fn pack_rows(
    a: &[bf16],
    rows: usize,
    k: usize,
    lda: usize,
    depth_blocks: usize,
    out: &mut [bf16],
) {
    let tile_values = 2 * TILE_WORDS;
    let block_values = 2 * row_block_words(depth_blocks);
    let full_depths = k / TILE_DEPTH;
    vectorised(
        #[inline(always)]
        || {
            for (block, packed) in out.chunks_exact_mut(block_values).enumerate() {
                for local in 0..BLOCK_ROWS {
                    let row = block * BLOCK_ROWS + local;
                    let (half, tile_row) = (local / TILE_ROWS, local % TILE_ROWS);
                    let slot = |d: usize| (d * 2 + half) * tile_values + tile_row * TILE_DEPTH;
                    if row >= rows {
                        for d in 0..depth_blocks {
                            packed[slot(d)..slot(d) + TILE_DEPTH].fill(bf16::ZERO);
                        }
                        continue;
                    }
                    let source = &a[row * lda..row * lda + k];
                    for d in 0..full_depths {
                        packed[slot(d)..slot(d) + TILE_DEPTH]
                            .copy_from_slice(&source[d * TILE_DEPTH..][..TILE_DEPTH]);
                    }
                    for d in full_depths..depth_blocks {
                        let target = &mut packed[slot(d)..slot(d) + TILE_DEPTH];
                        let tail = &source[(d * TILE_DEPTH).min(k)..];
                        let count = tail.len().min(TILE_DEPTH);
                        target[..count].copy_from_slice(&tail[..count]);
                        target[count..].fill(bf16::ZERO);
                    }
                }
            }
        },
    );
}
