//! The two resampling filters Musubi uses on 8-bit RGB: Pillow's `Image.resize(..., LANCZOS)` for
//! upscaling and OpenCV's `cv2.resize(..., INTER_AREA)` for downscaling, each re-implemented
//! following the library's own integer/float arithmetic so that results match byte for byte.
//!
//! `tests/image_io.rs` checks 12 cases (Lanczos up/down and one-axis, OpenCV area 2x2, 3x3,
//! fractional and one-axis, and Musubi's resize-to-bucket) against Pillow 13.0.0 and OpenCV 5.0.0
//! output bytes (`tools/reference/image_resize.py`): all identical. Not covered: Pillow's
//! `reducing_gap` (Musubi does not pass it), OpenCV builds whose area path reorders the f32
//! accumulation (a tie at .5 could then round the other way: at most 1 level), and Pillow modes
//! other than RGB (everything is converted to 8-bit RGB first, as Musubi does).

use image::RgbImage;

/// Pillow's fixed-point precision for 8-bit resampling (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Pillow's `lanczos_filter`: sinc(x) * sinc(x / 3) on [-3, 3).
fn lanczos(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// One output sample's source window and fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i64>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a whole axis.
fn lanczos_taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 3.0 * filter_scale;
    (0..out_size)
        .map(|out| {
            let center = (out as f64 + 0.5) * scale;
            // C `(int)` truncates toward zero.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let last = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (first..last)
                .map(|x| lanczos((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = raw.iter().sum();
            let one = (1i64 << PRECISION_BITS) as f64;
            let weights = raw
                .iter()
                .map(|&w| if total != 0.0 { w / total } else { w })
                .map(|w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i64
                    } else {
                        (0.5 + w * one) as i64
                    }
                })
                .collect();
            Taps { first, weights }
        })
        .collect()
}

/// Pillow's `clip8`: drop the fraction (arithmetic shift) and saturate.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow `Image.resize((width, height), Image.LANCZOS)` on RGB: a horizontal pass into an 8-bit
/// intermediate, then a vertical pass, each skipped when its size does not change.
pub fn resize_lanczos(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_width, in_height) = (image.width() as usize, image.height() as usize);
    let (out_width, out_height) = (width as usize, height as usize);
    let mut pixels = image.as_raw().clone();
    let mut current_width = in_width;
    let half = 1i64 << (PRECISION_BITS - 1);
    if out_width != in_width {
        let taps = lanczos_taps(in_width, out_width);
        let mut out = vec![0u8; out_width * in_height * 3];
        for y in 0..in_height {
            let row = &pixels[y * in_width * 3..(y + 1) * in_width * 3];
            for (x, tap) in taps.iter().enumerate() {
                for c in 0..3 {
                    let mut sum = half;
                    for (k, &w) in tap.weights.iter().enumerate() {
                        sum += row[(tap.first + k) * 3 + c] as i64 * w;
                    }
                    out[(y * out_width + x) * 3 + c] = clip8(sum);
                }
            }
        }
        pixels = out;
        current_width = out_width;
    }
    if out_height != in_height {
        let taps = lanczos_taps(in_height, out_height);
        let stride = current_width * 3;
        let mut out = vec![0u8; out_height * stride];
        for (y, tap) in taps.iter().enumerate() {
            for i in 0..stride {
                let mut sum = half;
                for (k, &w) in tap.weights.iter().enumerate() {
                    sum += pixels[(tap.first + k) * stride + i] as i64 * w;
                }
                out[y * stride + i] = clip8(sum);
            }
        }
        pixels = out;
    }
    RgbImage::from_raw(width, height, pixels).unwrap_or_else(|| RgbImage::new(width, height))
}

/// One source sample's contribution to one output sample (OpenCV `DecimateAlpha`).
struct AreaTap {
    source: usize,
    target: usize,
    alpha: f32,
}

/// OpenCV `computeResizeAreaTab` for one axis.
fn area_taps(in_size: usize, out_size: usize, scale: f64) -> Vec<AreaTap> {
    let mut taps = Vec::new();
    for target in 0..out_size {
        let start = target as f64 * scale;
        let end = start + scale;
        let cell = scale.min(in_size as f64 - start);
        let last = (end.floor() as usize).min(in_size - 1);
        let first = (start.ceil() as usize).min(last);
        if first as f64 - start > 1e-3 {
            taps.push(AreaTap {
                source: first - 1,
                target,
                alpha: ((first as f64 - start) / cell) as f32,
            });
        }
        for source in first..last {
            taps.push(AreaTap {
                source,
                target,
                alpha: (1.0 / cell) as f32,
            });
        }
        if end - last as f64 > 1e-3 {
            taps.push(AreaTap {
                source: last,
                target,
                alpha: ((end - last as f64).min(1.0).min(cell) / cell) as f32,
            });
        }
    }
    taps
}

/// OpenCV `saturate_cast<uchar>(float)`: round half to even, saturate.
fn round_u8(value: f32) -> u8 {
    value.round_ties_even().clamp(0.0, 255.0) as u8
}

/// OpenCV `cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)` for downscaling
/// (neither side grows) on 8-bit RGB: the exact 2x2 box path (`(sum + 2) >> 2`), the integer-scale
/// box path (`round(sum * (1/area))` in f32), and the general area-weighted path in f32.
/// Upscaling with INTER_AREA is bilinear in OpenCV and is not what Musubi uses; it is refused
/// by returning `None`.
pub fn resize_area(image: &RgbImage, width: u32, height: u32) -> Option<RgbImage> {
    let (in_width, in_height) = (image.width() as usize, image.height() as usize);
    let (out_width, out_height) = (width as usize, height as usize);
    if out_width == 0 || out_height == 0 || out_width > in_width || out_height > in_height {
        return None;
    }
    if out_width == in_width && out_height == in_height {
        return Some(image.clone());
    }
    let source = image.as_raw();
    // OpenCV computes the scale as 1 / (out / in).
    let scale_x = 1.0 / (out_width as f64 / in_width as f64);
    let scale_y = 1.0 / (out_height as f64 / in_height as f64);
    let integer_x = scale_x.round();
    let integer_y = scale_y.round();
    let mut out = vec![0u8; out_width * out_height * 3];
    if (scale_x - integer_x).abs() < f64::EPSILON && (scale_y - integer_y).abs() < f64::EPSILON {
        let (sx, sy) = (integer_x as usize, integer_y as usize);
        let area = sx * sy;
        let inverse = 1.0f32 / area as f32;
        for y in 0..out_height {
            for x in 0..out_width {
                for c in 0..3 {
                    let mut sum = 0u32;
                    for dy in 0..sy {
                        for dx in 0..sx {
                            sum += source[((y * sy + dy) * in_width + x * sx + dx) * 3 + c] as u32;
                        }
                    }
                    out[(y * out_width + x) * 3 + c] = if sx == 2 && sy == 2 {
                        ((sum + 2) >> 2) as u8
                    } else {
                        round_u8(sum as f32 * inverse)
                    };
                }
            }
        }
        return RgbImage::from_raw(width, height, out);
    }
    let x_taps = area_taps(in_width, out_width, scale_x);
    let y_taps = area_taps(in_height, out_height, scale_y);
    let row_len = out_width * 3;
    let mut buffer = vec![0f32; row_len];
    let mut sum = vec![0f32; row_len];
    let mut previous: Option<usize> = None;
    for tap in &y_taps {
        buffer.iter_mut().for_each(|v| *v = 0.0);
        let row = &source[tap.source * in_width * 3..(tap.source + 1) * in_width * 3];
        for x_tap in &x_taps {
            for c in 0..3 {
                let i = x_tap.target * 3 + c;
                buffer[i] += row[x_tap.source * 3 + c] as f32 * x_tap.alpha;
            }
        }
        if previous != Some(tap.target) {
            if let Some(done) = previous {
                for (o, &s) in out[done * row_len..(done + 1) * row_len]
                    .iter_mut()
                    .zip(&sum)
                {
                    *o = round_u8(s);
                }
            }
            for (s, &b) in sum.iter_mut().zip(&buffer) {
                *s = tap.alpha * b;
            }
            previous = Some(tap.target);
        } else {
            for (s, &b) in sum.iter_mut().zip(&buffer) {
                *s += tap.alpha * b;
            }
        }
    }
    if let Some(done) = previous {
        for (o, &s) in out[done * row_len..(done + 1) * row_len]
            .iter_mut()
            .zip(&sum)
        {
            *o = round_u8(s);
        }
    }
    RgbImage::from_raw(width, height, out)
}
