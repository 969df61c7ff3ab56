//! The AE's CPU convolution: a direct k x k convolution of f32 NCHW activations, without im2col
//! and without a library GEMM.
//!
//! The input is copied strip by strip (a band of output rows at a time) into a buffer that already
//! holds the zero padding, the nearest-x2 upsampling and, optionally, the GroupNorm + swish of the
//! previous layer, laid out so that every kernel tap reads a contiguous run of pixels: one plane
//! per channel for stride 1, and for stride s one plane per channel and per (row, column) phase
//! modulo s. The output pixels of a strip are then a flat run over those planes (each row padded
//! with the `(k - 1) / s` columns that the planes carry), cut into tiles of `TILE_PIXELS` pixels
//! times `TILE_ROWS` output channels whose sums stay in registers over all input channels and
//! taps; the weights are packed once so that each step of that sum reads `TILE_ROWS` consecutive
//! values. Bias and an optional residual are added as each tile is stored, so every output value
//! is written once, with no accumulation passes over memory.

use rayon::prelude::*;

use super::layers::Padding;
use crate::nn::host::{vectorised, with_f32_scratch, SharedOutput};
use crate::nn::softmax::exp;

/// Output channels per register tile.
const TILE_ROWS: usize = 8;
/// 16-float vectors of output pixels per register tile.
const TILE_VECTORS: usize = 3;
/// Output pixels per register tile.
const TILE_PIXELS: usize = TILE_VECTORS * 16;
/// Output pixels per parallel work item (a multiple of `TILE_PIXELS`): its partial sums for all
/// output channels stay in L2.
const BLOCK_PIXELS: usize = 4 * TILE_PIXELS;
/// Input channels summed per pass over a work item's tiles: the input one tile reads for them
/// (about `CHUNK_CHANNELS * k * (TILE_PIXELS + k)` values) stays in L1 while every output-channel
/// tile uses it, and their weights for all output channels stay in L2.
const CHUNK_CHANNELS: usize = 16;

/// A convolution's weights packed for the tile kernel, and its bias.
pub struct PackedConvolution {
    out_channels: usize,
    in_channels: usize,
    kernel: usize,
    /// `[out tile][in channel][tap (ky, kx)][TILE_ROWS]`, zero rows past `out_channels`.
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl PackedConvolution {
    /// Packs `weight` `[out, in, k, k]` (row-major) and `bias` `[out]`.
    pub fn new(weight: &[f32], bias: &[f32], out_channels: usize, in_channels: usize) -> Self {
        let taps = weight.len() / (out_channels * in_channels).max(1);
        let kernel = (taps as f64).sqrt().round() as usize;
        let tiles = out_channels.div_ceil(TILE_ROWS);
        let mut packed = vec![0f32; tiles * in_channels * taps * TILE_ROWS];
        for o in 0..out_channels {
            let (tile, row) = (o / TILE_ROWS, o % TILE_ROWS);
            for c in 0..in_channels {
                for t in 0..taps {
                    let index = ((tile * in_channels + c) * taps + t) * TILE_ROWS + row;
                    packed[index] = weight[(o * in_channels + c) * taps + t];
                }
            }
        }
        Self {
            out_channels,
            in_channels,
            kernel,
            weights: packed,
            bias: bias.to_vec(),
        }
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }
}

/// `swish(x * scale + shift)` (or without swish) per `(batch, channel)`, applied to the input as
/// it is gathered: a GroupNorm folded into the following convolution.
pub struct InputTransform<'a> {
    pub scale: &'a [f32],
    pub shift: &'a [f32],
    pub swish: bool,
    /// Rounds the transformed values to bf16, as a bf16 activation would be.
    pub round_to_bf16: bool,
}

/// The shape of a convolution's input and how it is read.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub stride: usize,
    pub padding: Padding,
    /// Nearest-neighbour x2 upsampling before the padding.
    pub upsample: bool,
}

impl Geometry {
    fn factor(&self) -> usize {
        if self.upsample {
            2
        } else {
            1
        }
    }

    /// Output height and width for a `kernel` x `kernel` convolution, or `None` when the padded
    /// input is smaller than the kernel.
    pub fn output_size(&self, kernel: usize) -> Option<(usize, usize)> {
        let padded_height = self.height * self.factor() + self.padding.top + self.padding.bottom;
        let padded_width = self.width * self.factor() + self.padding.left + self.padding.right;
        if padded_height < kernel || padded_width < kernel || self.stride == 0 {
            return None;
        }
        Some((
            (padded_height - kernel) / self.stride + 1,
            (padded_width - kernel) / self.stride + 1,
        ))
    }
}

/// The layout of one strip's gathered input.
struct Strip {
    /// First output row.
    row: usize,
    rows: usize,
    /// Rows and columns of one phase plane.
    plane_rows: usize,
    pitch: usize,
    phases: usize,
}

impl Strip {
    fn plane(&self) -> usize {
        self.plane_rows * self.pitch
    }
}

/// Convolves `source` (`geometry`, contiguous f32 NCHW) with `convolution`, adding its bias and,
/// when given, `residual` (the output's shape); the input is transformed by `transform` first
/// when given. Strips hold about `strip_bytes` of gathered input. Returns the output
/// `[batch, out, out_height, out_width]`, or `None` when the input is smaller than the kernel.
pub fn convolve(
    source: &[f32],
    geometry: &Geometry,
    convolution: &PackedConvolution,
    transform: Option<&InputTransform>,
    residual: Option<&[f32]>,
    strip_bytes: usize,
) -> Option<(Vec<f32>, [usize; 4])> {
    let kernel = convolution.kernel;
    let (out_height, out_width) = geometry.output_size(kernel)?;
    let stride = geometry.stride;
    let reach = (kernel - 1) / stride;
    let pitch = out_width + reach;
    let phases = stride * stride;
    let channels = geometry.channels;
    let batch = geometry.batch;
    let out_channels = convolution.out_channels;
    let total = batch * out_channels * out_height * out_width;
    if residual.is_some_and(|r| r.len() != total) || channels != convolution.in_channels {
        return None;
    }
    let row_bytes = batch * phases * channels * pitch * std::mem::size_of::<f32>();
    let rows_per_strip = (strip_bytes / row_bytes.max(1)).clamp(1, out_height);
    let largest_plane = (rows_per_strip + reach) * pitch;
    // Slack past the last plane: the last tile of a strip reads up to TILE_PIXELS + reach beyond.
    let mut gathered = vec![0f32; batch * phases * channels * largest_plane + TILE_PIXELS + reach];
    // Zeroed, so that the tiles write through slices of initialised memory; a fresh large
    // allocation is zero pages from the kernel, so this costs no extra pass.
    let mut output = vec![0f32; total];
    let target = SharedOutput(output.as_mut_ptr());
    let mut row = 0;
    while row < out_height {
        let rows = rows_per_strip.min(out_height - row);
        let strip = Strip {
            row,
            rows,
            plane_rows: rows + reach,
            pitch,
            phases,
        };
        gather(source, geometry, &strip, transform, &mut gathered);
        compute_strip(
            &gathered,
            geometry,
            &strip,
            convolution,
            (out_height, out_width),
            residual,
            target,
        );
        row += rows;
    }
    Some((output, [batch, out_channels, out_height, out_width]))
}

/// Fills `gathered` with the strip's padded (upsampled, transformed) input planes, laid out
/// `[batch][phase][channel][plane_rows][pitch]`.
fn gather(
    source: &[f32],
    geometry: &Geometry,
    strip: &Strip,
    transform: Option<&InputTransform>,
    gathered: &mut [f32],
) {
    let Geometry {
        channels,
        height,
        width,
        stride,
        padding,
        ..
    } = *geometry;
    let factor = geometry.factor();
    let (in_height, in_width) = (height * factor, width * factor);
    let plane = strip.plane();
    let planes = geometry.batch * strip.phases * channels;
    gathered[..planes * plane]
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(index, target)| {
            let image_channel = (index / (strip.phases * channels)) * channels + index % channels;
            let phase = (index / channels) % strip.phases;
            let (phase_y, phase_x) = (phase / stride, phase % stride);
            let (scale, shift) = transform.map_or((1.0, 0.0), |t| {
                (t.scale[image_channel], t.shift[image_channel])
            });
            let channel_source = &source[image_channel * height * width..][..height * width];
            // Columns j of the plane whose padded column j * stride + phase_x is inside the input.
            let first = padding.left.saturating_sub(phase_x).div_ceil(stride);
            let end = (in_width + padding.left)
                .saturating_sub(phase_x)
                .div_ceil(stride)
                .min(strip.pitch)
                .max(first);
            for (i, target_row) in target.chunks_exact_mut(strip.pitch).enumerate() {
                let padded_y = (strip.row + i) * stride + phase_y;
                let inside = padded_y >= padding.top && padded_y - padding.top < in_height;
                if !inside || first == end {
                    target_row.fill(0.0);
                    continue;
                }
                let source_row =
                    &channel_source[(padded_y - padding.top) / factor * width..][..width];
                target_row[..first].fill(0.0);
                target_row[end..].fill(0.0);
                let interior = &mut target_row[first..end];
                // Input column of plane column `first`, then one step of `stride` per column.
                let start = first * stride + phase_x - padding.left;
                copy_columns(interior, source_row, start, stride, factor);
                if let Some(transform) = transform {
                    apply_transform(interior, scale, shift, transform);
                }
            }
        });
}

/// `target[j] = source_row[(start + j * stride) / factor]`.
fn copy_columns(
    target: &mut [f32],
    source_row: &[f32],
    start: usize,
    stride: usize,
    factor: usize,
) {
    if stride == 1 && factor == 1 {
        target.copy_from_slice(&source_row[start..start + target.len()]);
    } else if stride == 1 && factor == 2 {
        vectorised(
            #[inline(always)]
            || {
                for (j, value) in target.iter_mut().enumerate() {
                    *value = source_row[(start + j) / 2];
                }
            },
        );
    } else {
        for (j, value) in target.iter_mut().enumerate() {
            *value = source_row[(start + j * stride) / factor];
        }
    }
}

/// `values = swish(values * scale + shift)` (swish and bf16 rounding as `transform` says).
pub fn apply_transform(values: &mut [f32], scale: f32, shift: f32, transform: &InputTransform) {
    // Inlined into `vectorised`'s AVX-512 (and FMA) function: compiled on its own, this closure
    // was baseline SSE code.
    vectorised(
        #[inline(always)]
        || {
            if transform.swish {
                for value in values.iter_mut() {
                    let y = *value * scale + shift;
                    *value = y / (1.0 + exp(-y));
                }
            } else {
                for value in values.iter_mut() {
                    *value = *value * scale + shift;
                }
            }
            if transform.round_to_bf16 {
                for value in values.iter_mut() {
                    *value = half::bf16::from_f32(*value).to_f32();
                }
            }
        },
    );
}

/// Runs every (batch, pixel block) of a strip in parallel.
fn compute_strip(
    gathered: &[f32],
    geometry: &Geometry,
    strip: &Strip,
    convolution: &PackedConvolution,
    output_size: (usize, usize),
    residual: Option<&[f32]>,
    target: SharedOutput<f32>,
) {
    let channels = geometry.channels;
    let plane = strip.plane();
    let kernel = convolution.kernel;
    let stride = geometry.stride;
    // Offset of each tap's first input in the batch's gathered planes.
    let offsets: Vec<usize> = (0..kernel * kernel)
        .map(|t| {
            let (ky, kx) = (t / kernel, t % kernel);
            let phase = (ky % stride) * stride + kx % stride;
            phase * channels * plane + (ky / stride) * strip.pitch + kx / stride
        })
        .collect();
    let pixels = strip.rows * strip.pitch;
    let blocks = pixels.div_ceil(BLOCK_PIXELS);
    let use_avx512 = has_avx512();
    let out_tiles = convolution.out_channels.div_ceil(TILE_ROWS);
    let taps = offsets.len();
    let reads = read_ranges(&offsets);
    let tile_values = TILE_ROWS * TILE_PIXELS;
    (0..geometry.batch * blocks)
        .into_par_iter()
        .for_each(|item| {
            let (b, block) = (item / blocks, item % blocks);
            let input = &gathered[b * strip.phases * channels * plane..];
            let first = block * BLOCK_PIXELS;
            let end = (first + BLOCK_PIXELS).min(pixels);
            let tiles = (end - first).div_ceil(TILE_PIXELS);
            // Partial sums [pixel tile][output-channel tile][TILE_ROWS][TILE_PIXELS].
            with_f32_scratch(tiles * out_tiles * tile_values, |sums| {
                let mut chunk_start = 0;
                while chunk_start < channels {
                    let chunk = CHUNK_CHANNELS.min(channels - chunk_start);
                    for tile in 0..tiles {
                        let tile_input = &input[chunk_start * plane + first + tile * TILE_PIXELS..];
                        // The next tile's input (or the next chunk's first), scattered over `chunk`
                        // planes that the hardware prefetcher does not follow, is requested now so
                        // that its first output-channel tile does not wait on memory.
                        let (next_chunk, next_tile) = if tile + 1 < tiles {
                            (chunk_start, tile + 1)
                        } else {
                            (chunk_start + chunk, 0)
                        };
                        if next_chunk < channels {
                            let next_channels = CHUNK_CHANNELS.min(channels - next_chunk);
                            prefetch(
                                &input[next_chunk * plane + first + next_tile * TILE_PIXELS..],
                                plane,
                                next_channels,
                                &reads,
                            );
                        }
                        for out_tile in 0..out_tiles {
                            let weights = &convolution.weights
                                [(out_tile * channels + chunk_start) * taps * TILE_ROWS..]
                                [..chunk * taps * TILE_ROWS];
                            let tile_sums = &mut sums
                                [(tile * out_tiles + out_tile) * tile_values..][..tile_values];
                            let accumulate = chunk_start > 0;
                            if use_avx512 {
                                // SAFETY: AVX-512F was detected; every read `offset + c * plane +
                                // pixel + i` (i < TILE_PIXELS) lies in `gathered`, whose slack covers
                                // the last tile.
                                unsafe {
                                    tile_avx512(
                                        tile_input, plane, chunk, &offsets, weights, tile_sums,
                                        accumulate,
                                    )
                                };
                            } else {
                                tile_portable(
                                    tile_input, plane, chunk, &offsets, weights, tile_sums,
                                    accumulate,
                                );
                            }
                        }
                    }
                    chunk_start += chunk;
                }
                for tile in 0..tiles {
                    for out_tile in 0..out_tiles {
                        store_tile(
                            &sums[(tile * out_tiles + out_tile) * tile_values..][..tile_values],
                            (b, out_tile, first + tile * TILE_PIXELS, end),
                            strip,
                            convolution,
                            output_size,
                            residual,
                            target,
                        );
                    }
                }
            });
        });
}

/// The ranges `[start, end)` of input values (relative to a tile's first pixel in one channel)
/// that a tile reads for all taps, overlapping reads merged.
fn read_ranges(offsets: &[usize]) -> Vec<(usize, usize)> {
    let mut sorted = offsets.to_vec();
    sorted.sort_unstable();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for offset in sorted {
        match ranges.last_mut() {
            Some(last) if offset <= last.1 => last.1 = last.1.max(offset + TILE_PIXELS),
            _ => ranges.push((offset, offset + TILE_PIXELS)),
        }
    }
    ranges
}

/// Asks for the cache lines of `ranges` in `channels` planes of `input` to be brought into L2.
fn prefetch(input: &[f32], plane: usize, channels: usize, ranges: &[(usize, usize)]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        const LINE: usize = 64 / std::mem::size_of::<f32>();
        for c in 0..channels {
            for &(start, end) in ranges {
                let mut index = c * plane + start;
                let last = c * plane + end - 1;
                while index < last + LINE {
                    let clamped = index.min(last);
                    if clamped < input.len() {
                        // SAFETY: prefetching is a hint that never faults; the pointer is
                        // inside `input`.
                        unsafe { _mm_prefetch::<_MM_HINT_T1>(input.as_ptr().add(clamped).cast()) };
                    }
                    index += LINE;
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (input, plane, channels, ranges);
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Adds bias (and residual) to a finished tile and writes its valid pixels to the output.
/// `position` is (batch, output-channel tile, first flat pixel, end of the work item's pixels).
fn store_tile(
    tile: &[f32],
    position: (usize, usize, usize, usize),
    strip: &Strip,
    convolution: &PackedConvolution,
    (out_height, out_width): (usize, usize),
    residual: Option<&[f32]>,
    target: SharedOutput<f32>,
) {
    let (b, out_tile, pixel, end) = position;
    let count = TILE_PIXELS.min(end - pixel);
    let out_channels = convolution.out_channels;
    vectorised(
        #[inline(always)]
        || {
            for row in 0..TILE_ROWS {
                let o = out_tile * TILE_ROWS + row;
                if o >= out_channels {
                    break;
                }
                let bias = convolution.bias[o];
                let channel_base = (b * out_channels + o) * out_height * out_width;
                let values = &tile[row * TILE_PIXELS..][..count];
                let (mut y, mut x) = (pixel / strip.pitch, pixel % strip.pitch);
                let mut q = 0;
                while q < count {
                    // The run of this tile inside one output row.
                    let run = (strip.pitch - x).min(count - q);
                    let valid = run.min(out_width.saturating_sub(x));
                    if valid > 0 {
                        let index = channel_base + (strip.row + y) * out_width + x;
                        // SAFETY: elements `index..index + valid` are the output values of (b, o,
                        // strip.row + y, x..x + valid), inside the buffer and written by this tile only.
                        let out = unsafe {
                            std::slice::from_raw_parts_mut(target.pointer().add(index), valid)
                        };
                        let sums = &values[q..q + valid];
                        match residual {
                            Some(residual) => {
                                let residual = &residual[index..index + valid];
                                for ((out, &sum), &r) in out.iter_mut().zip(sums).zip(residual) {
                                    *out = sum + bias + r;
                                }
                            }
                            None => {
                                for (out, &sum) in out.iter_mut().zip(sums) {
                                    *out = sum + bias;
                                }
                            }
                        }
                    }
                    q += run;
                    x = 0;
                    y += 1;
                }
            }
        },
    );
}

/// The register tile: `tile[r][i] (+)= sum over channels c and taps t of
/// weights[c][t][r] * input[c * plane + offsets[t] + i]` (`+=` when `accumulate`), in AVX-512
/// assembly: the `TILE_ROWS x TILE_PIXELS` sums live in zmm0-23 for the whole sum, each step loads
/// the tap's three pixel vectors once and broadcasts the eight weights. (Assembly rather than
/// intrinsics: the AVX-512 intrinsics need a newer Rust than this crate's minimum, and the
/// compiler does not keep array sums of this size in registers by itself.)
///
/// # Safety
/// The CPU has AVX-512F; every read `input[c * plane + offsets[t] + i]` for `c < channels`,
/// `i < TILE_PIXELS` is inside `input`; `weights` holds `channels * offsets.len() * TILE_ROWS`
/// values and `tile` `TILE_ROWS * TILE_PIXELS`.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_avx512(
    input: &[f32],
    plane: usize,
    channels: usize,
    offsets: &[usize],
    weights: &[f32],
    tile: &mut [f32],
    accumulate: bool,
) {
    // The assembly below hard-codes this tile shape.
    const _: () = assert!(TILE_ROWS == 8 && TILE_VECTORS == 3);
    debug_assert!(weights.len() >= channels * offsets.len() * TILE_ROWS);
    debug_assert!(tile.len() >= TILE_ROWS * TILE_PIXELS);
    if offsets.is_empty() {
        if !accumulate {
            tile[..TILE_ROWS * TILE_PIXELS].fill(0.0);
        }
        return;
    }
    // SAFETY: the reads and writes stay inside the slices, as the caller guarantees; every
    // vector register the code writes is declared clobbered.
    unsafe {
        std::arch::asm!(
            "test {accumulate}, {accumulate}",
            "jz 2f",
            "vmovups zmm0, zmmword ptr [{tile} + 0]",
            "vmovups zmm1, zmmword ptr [{tile} + 64]",
            "vmovups zmm2, zmmword ptr [{tile} + 128]",
            "vmovups zmm3, zmmword ptr [{tile} + 192]",
            "vmovups zmm4, zmmword ptr [{tile} + 256]",
            "vmovups zmm5, zmmword ptr [{tile} + 320]",
            "vmovups zmm6, zmmword ptr [{tile} + 384]",
            "vmovups zmm7, zmmword ptr [{tile} + 448]",
            "vmovups zmm8, zmmword ptr [{tile} + 512]",
            "vmovups zmm9, zmmword ptr [{tile} + 576]",
            "vmovups zmm10, zmmword ptr [{tile} + 640]",
            "vmovups zmm11, zmmword ptr [{tile} + 704]",
            "vmovups zmm12, zmmword ptr [{tile} + 768]",
            "vmovups zmm13, zmmword ptr [{tile} + 832]",
            "vmovups zmm14, zmmword ptr [{tile} + 896]",
            "vmovups zmm15, zmmword ptr [{tile} + 960]",
            "vmovups zmm16, zmmword ptr [{tile} + 1024]",
            "vmovups zmm17, zmmword ptr [{tile} + 1088]",
            "vmovups zmm18, zmmword ptr [{tile} + 1152]",
            "vmovups zmm19, zmmword ptr [{tile} + 1216]",
            "vmovups zmm20, zmmword ptr [{tile} + 1280]",
            "vmovups zmm21, zmmword ptr [{tile} + 1344]",
            "vmovups zmm22, zmmword ptr [{tile} + 1408]",
            "vmovups zmm23, zmmword ptr [{tile} + 1472]",
            "jmp 3f",
            "2:",
            "vpxord zmm0, zmm0, zmm0",
            "vpxord zmm1, zmm1, zmm1",
            "vpxord zmm2, zmm2, zmm2",
            "vpxord zmm3, zmm3, zmm3",
            "vpxord zmm4, zmm4, zmm4",
            "vpxord zmm5, zmm5, zmm5",
            "vpxord zmm6, zmm6, zmm6",
            "vpxord zmm7, zmm7, zmm7",
            "vpxord zmm8, zmm8, zmm8",
            "vpxord zmm9, zmm9, zmm9",
            "vpxord zmm10, zmm10, zmm10",
            "vpxord zmm11, zmm11, zmm11",
            "vpxord zmm12, zmm12, zmm12",
            "vpxord zmm13, zmm13, zmm13",
            "vpxord zmm14, zmm14, zmm14",
            "vpxord zmm15, zmm15, zmm15",
            "vpxord zmm16, zmm16, zmm16",
            "vpxord zmm17, zmm17, zmm17",
            "vpxord zmm18, zmm18, zmm18",
            "vpxord zmm19, zmm19, zmm19",
            "vpxord zmm20, zmm20, zmm20",
            "vpxord zmm21, zmm21, zmm21",
            "vpxord zmm22, zmm22, zmm22",
            "vpxord zmm23, zmm23, zmm23",
            "3:",
            "test {channels}, {channels}",
            "jz 6f",
            "4:",
            "mov {cursor}, {offsets}",
            "mov {count}, {taps}",
            "5:",
            "mov {address}, qword ptr [{cursor}]",
            "lea {address}, [{channel} + {address} * 4]",
            "vmovups zmm24, zmmword ptr [{address}]",
            "vmovups zmm25, zmmword ptr [{address} + 64]",
            "vmovups zmm26, zmmword ptr [{address} + 128]",
            "vbroadcastss zmm27, dword ptr [{weight} + 0]",
            "vfmadd231ps zmm0, zmm24, zmm27",
            "vfmadd231ps zmm1, zmm25, zmm27",
            "vfmadd231ps zmm2, zmm26, zmm27",
            "vbroadcastss zmm28, dword ptr [{weight} + 4]",
            "vfmadd231ps zmm3, zmm24, zmm28",
            "vfmadd231ps zmm4, zmm25, zmm28",
            "vfmadd231ps zmm5, zmm26, zmm28",
            "vbroadcastss zmm27, dword ptr [{weight} + 8]",
            "vfmadd231ps zmm6, zmm24, zmm27",
            "vfmadd231ps zmm7, zmm25, zmm27",
            "vfmadd231ps zmm8, zmm26, zmm27",
            "vbroadcastss zmm28, dword ptr [{weight} + 12]",
            "vfmadd231ps zmm9, zmm24, zmm28",
            "vfmadd231ps zmm10, zmm25, zmm28",
            "vfmadd231ps zmm11, zmm26, zmm28",
            "vbroadcastss zmm27, dword ptr [{weight} + 16]",
            "vfmadd231ps zmm12, zmm24, zmm27",
            "vfmadd231ps zmm13, zmm25, zmm27",
            "vfmadd231ps zmm14, zmm26, zmm27",
            "vbroadcastss zmm28, dword ptr [{weight} + 20]",
            "vfmadd231ps zmm15, zmm24, zmm28",
            "vfmadd231ps zmm16, zmm25, zmm28",
            "vfmadd231ps zmm17, zmm26, zmm28",
            "vbroadcastss zmm27, dword ptr [{weight} + 24]",
            "vfmadd231ps zmm18, zmm24, zmm27",
            "vfmadd231ps zmm19, zmm25, zmm27",
            "vfmadd231ps zmm20, zmm26, zmm27",
            "vbroadcastss zmm28, dword ptr [{weight} + 28]",
            "vfmadd231ps zmm21, zmm24, zmm28",
            "vfmadd231ps zmm22, zmm25, zmm28",
            "vfmadd231ps zmm23, zmm26, zmm28",
            "add {weight}, 32",
            "add {cursor}, 8",
            "dec {count}",
            "jnz 5b",
            "add {channel}, {plane_bytes}",
            "dec {channels}",
            "jnz 4b",
            "6:",
            "vmovups zmmword ptr [{tile} + 0], zmm0",
            "vmovups zmmword ptr [{tile} + 64], zmm1",
            "vmovups zmmword ptr [{tile} + 128], zmm2",
            "vmovups zmmword ptr [{tile} + 192], zmm3",
            "vmovups zmmword ptr [{tile} + 256], zmm4",
            "vmovups zmmword ptr [{tile} + 320], zmm5",
            "vmovups zmmword ptr [{tile} + 384], zmm6",
            "vmovups zmmword ptr [{tile} + 448], zmm7",
            "vmovups zmmword ptr [{tile} + 512], zmm8",
            "vmovups zmmword ptr [{tile} + 576], zmm9",
            "vmovups zmmword ptr [{tile} + 640], zmm10",
            "vmovups zmmword ptr [{tile} + 704], zmm11",
            "vmovups zmmword ptr [{tile} + 768], zmm12",
            "vmovups zmmword ptr [{tile} + 832], zmm13",
            "vmovups zmmword ptr [{tile} + 896], zmm14",
            "vmovups zmmword ptr [{tile} + 960], zmm15",
            "vmovups zmmword ptr [{tile} + 1024], zmm16",
            "vmovups zmmword ptr [{tile} + 1088], zmm17",
            "vmovups zmmword ptr [{tile} + 1152], zmm18",
            "vmovups zmmword ptr [{tile} + 1216], zmm19",
            "vmovups zmmword ptr [{tile} + 1280], zmm20",
            "vmovups zmmword ptr [{tile} + 1344], zmm21",
            "vmovups zmmword ptr [{tile} + 1408], zmm22",
            "vmovups zmmword ptr [{tile} + 1472], zmm23",
            accumulate = in(reg) usize::from(accumulate),
            channels = inout(reg) channels => _,
            offsets = in(reg) offsets.as_ptr(),
            taps = in(reg) offsets.len(),
            plane_bytes = in(reg) plane * std::mem::size_of::<f32>(),
            channel = inout(reg) input.as_ptr() => _,
            weight = inout(reg) weights.as_ptr() => _,
            tile = in(reg) tile.as_mut_ptr(),
            cursor = out(reg) _,
            count = out(reg) _,
            address = out(reg) _,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
            out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
            out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
            out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _,
            options(nostack),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_avx512(
    input: &[f32],
    plane: usize,
    channels: usize,
    offsets: &[usize],
    weights: &[f32],
    tile: &mut [f32],
    accumulate: bool,
) {
    tile_portable(input, plane, channels, offsets, weights, tile, accumulate)
}

/// [`tile_avx512`] for any CPU.
fn tile_portable(
    input: &[f32],
    plane: usize,
    channels: usize,
    offsets: &[usize],
    weights: &[f32],
    tile: &mut [f32],
    accumulate: bool,
) {
    let tile = &mut tile[..TILE_ROWS * TILE_PIXELS];
    if !accumulate {
        tile.fill(0.0);
    }
    let taps = offsets.len();
    for c in 0..channels {
        for (t, &offset) in offsets.iter().enumerate() {
            let source = &input[c * plane + offset..][..TILE_PIXELS];
            let weight = &weights[(c * taps + t) * TILE_ROWS..][..TILE_ROWS];
            for (row, &w) in tile.chunks_exact_mut(TILE_PIXELS).zip(weight) {
                for (sum, &x) in row.iter_mut().zip(source) {
                    *sum += w * x;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SeededRng;

    /// The textbook convolution of the (upsampled) zero-padded input.
    fn naive(
        source: &[f32],
        geometry: &Geometry,
        weight: &[f32],
        bias: &[f32],
        kernel: usize,
    ) -> (Vec<f32>, [usize; 4]) {
        let (oh, ow) = geometry.output_size(kernel).unwrap();
        let Geometry {
            batch,
            channels,
            height,
            width,
            stride,
            padding,
            ..
        } = *geometry;
        let factor = geometry.factor();
        let out = bias.len();
        let mut output = vec![0f32; batch * out * oh * ow];
        for b in 0..batch {
            for o in 0..out {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut sum = bias[o] as f64;
                        for c in 0..channels {
                            for ky in 0..kernel {
                                for kx in 0..kernel {
                                    let py = (y * stride + ky) as isize - padding.top as isize;
                                    let px = (x * stride + kx) as isize - padding.left as isize;
                                    let inside = py >= 0
                                        && px >= 0
                                        && (py as usize) < height * factor
                                        && (px as usize) < width * factor;
                                    if inside {
                                        let sy = py as usize / factor;
                                        let sx = px as usize / factor;
                                        let value =
                                            source[((b * channels + c) * height + sy) * width + sx];
                                        let w = weight
                                            [((o * channels + c) * kernel + ky) * kernel + kx];
                                        sum += value as f64 * w as f64;
                                    }
                                }
                            }
                        }
                        output[((b * out + o) * oh + y) * ow + x] = sum as f32;
                    }
                }
            }
        }
        (output, [batch, out, oh, ow])
    }

    fn max_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Odd sizes, channel counts that are not multiples of the tile, stride 1 and 2, asymmetric
    /// padding, upsampling, 1x1 and 3x3 kernels, and strips of one row up to the whole image all
    /// agree with the naive convolution; the residual is added.
    #[test]
    fn matches_the_naive_convolution() {
        let mut rng = SeededRng::new(11);
        let downsample = Padding {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        let cases = [
            // (batch, channels, out, height, width, kernel, stride, padding, upsample)
            (2, 5, 11, 7, 9, 3, 1, Padding::uniform(1), false),
            (1, 17, 9, 13, 5, 3, 1, Padding::uniform(1), true),
            (2, 3, 19, 9, 11, 3, 2, downsample, false),
            (1, 6, 7, 10, 8, 3, 2, Padding::uniform(1), false),
            (1, 20, 13, 6, 7, 1, 1, Padding::uniform(0), false),
            (1, 4, 3, 5, 6, 3, 1, Padding::uniform(0), true),
            (1, 18, 33, 31, 29, 3, 1, Padding::uniform(1), false),
        ];
        for (batch, channels, out, height, width, kernel, stride, padding, upsample) in cases {
            let geometry = Geometry {
                batch,
                channels,
                height,
                width,
                stride,
                padding,
                upsample,
            };
            let source = rng.normal_vec(batch * channels * height * width);
            let weight = rng.normal_vec(out * channels * kernel * kernel);
            let bias = rng.normal_vec(out);
            let packed = PackedConvolution::new(&weight, &bias, out, channels);
            let (expected, shape) = naive(&source, &geometry, &weight, &bias, kernel);
            let residual = rng.normal_vec(expected.len());
            let with_residual: Vec<f32> =
                expected.iter().zip(&residual).map(|(a, b)| a + b).collect();
            let row_bytes = batch * stride * stride * channels * (shape[3] + 2) * 4;
            for strip_rows in [1, 2, 5, 1000] {
                let (y, dims) = convolve(
                    &source,
                    &geometry,
                    &packed,
                    None,
                    None,
                    strip_rows * row_bytes,
                )
                .unwrap();
                assert_eq!(dims, shape);
                let difference = max_difference(&y, &expected);
                assert!(
                    difference < 1e-4,
                    "{geometry:?} kernel {kernel} strip {strip_rows}: {difference}"
                );
                let (y, _) = convolve(
                    &source,
                    &geometry,
                    &packed,
                    None,
                    Some(&residual),
                    strip_rows * row_bytes,
                )
                .unwrap();
                assert!(max_difference(&y, &with_residual) < 1e-4);
            }
        }
    }

    /// The input transform equals transforming the input first.
    #[test]
    fn transform_matches_a_transformed_input() {
        let mut rng = SeededRng::new(12);
        let (channels, out, height, width) = (5, 6, 8, 7);
        let geometry = Geometry {
            batch: 2,
            channels,
            height,
            width,
            stride: 1,
            padding: Padding::uniform(1),
            upsample: true,
        };
        let source = rng.normal_vec(2 * channels * height * width);
        let scale = rng.normal_vec(2 * channels);
        let shift = rng.normal_vec(2 * channels);
        let weight = rng.normal_vec(out * channels * 9);
        let bias = rng.normal_vec(out);
        let packed = PackedConvolution::new(&weight, &bias, out, channels);
        let transformed: Vec<f32> = source
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let channel = i / (height * width);
                let y = x * scale[channel] + shift[channel];
                y / (1.0 + (-y).exp())
            })
            .collect();
        let (expected, _) = naive(&transformed, &geometry, &weight, &bias, 3);
        let transform = InputTransform {
            scale: &scale,
            shift: &shift,
            swish: true,
            round_to_bf16: false,
        };
        let (y, _) =
            convolve(&source, &geometry, &packed, Some(&transform), None, 1 << 20).unwrap();
        assert!(max_difference(&y, &expected) < 1e-4);
    }

    /// The portable tile equals the AVX-512 one (when the CPU has it).
    #[test]
    fn portable_tile_matches() {
        if !has_avx512() {
            return;
        }
        let mut rng = SeededRng::new(13);
        let (channels, plane) = (7, 300);
        let offsets = [0, 1, 2, 40, 41, 42, 80, 81, 82];
        let input = rng.normal_vec(channels * plane + TILE_PIXELS);
        let weights = rng.normal_vec(channels * offsets.len() * TILE_ROWS);
        let mut fast = [0f32; TILE_ROWS * TILE_PIXELS];
        let mut portable = [0f32; TILE_ROWS * TILE_PIXELS];
        // SAFETY: AVX-512F detected; reads end at (channels - 1) * plane + 82 + TILE_PIXELS.
        for accumulate in [false, true] {
            unsafe {
                tile_avx512(
                    &input, plane, channels, &offsets, &weights, &mut fast, accumulate,
                )
            };
            tile_portable(
                &input,
                plane,
                channels,
                &offsets,
                &weights,
                &mut portable,
                accumulate,
            );
            assert!(max_difference(&fast, &portable) < 1e-4);
        }
    }
}
