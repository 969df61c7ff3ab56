//! Musubi's aspect-ratio buckets (`dataset/bucket.py` `BucketSelector`), so that bucket sizes,
//! and therefore cache keys and batches, match Musubi's both ways. Sizes are `(width, height)`.

use crate::image_io::{divisible_by, RESOLUTION_STEPS};

/// The buckets of one dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketSelector {
    /// Target area (`resolution` W * H).
    area: u64,
    /// Small images keep their own size (floored to 16) instead of being enlarged.
    no_upscale: bool,
    /// Sorted, without duplicates.
    resolutions: Vec<(u32, u32)>,
}

impl BucketSelector {
    /// Musubi's `BucketSelector.__init__`:
    /// * bucketing off: the single bucket `resolution`, and `no_upscale` is forced off;
    /// * bucketing on: `s = int(sqrt(W*H))`; for every `w` in `range(floor16(s // 2), s + 16, 16)`
    ///   the pairs `(w, floor16(W*H // w))` and its transpose, de-duplicated and sorted.
    pub fn new(resolution: (u32, u32), enable_bucket: bool, no_upscale: bool) -> Self {
        let area = resolution.0 as u64 * resolution.1 as u64;
        if !enable_bucket {
            return Self {
                area,
                no_upscale: false,
                resolutions: vec![resolution],
            };
        }
        let steps = RESOLUTION_STEPS as u64;
        // Python's int(math.sqrt(area)): the float square root, truncated.
        let side = (area as f64).sqrt() as u64;
        let minimum = (side / 2) - (side / 2) % steps;
        let mut resolutions = Vec::new();
        let mut width = minimum;
        while width < side + steps {
            if let Some(quotient) = area.checked_div(width) {
                let height = quotient - quotient % steps;
                resolutions.push((width as u32, height as u32));
                resolutions.push((height as u32, width as u32));
            }
            width += steps;
        }
        resolutions.sort_unstable();
        resolutions.dedup();
        Self {
            area,
            no_upscale,
            resolutions,
        }
    }

    /// The candidate buckets, sorted as Musubi sorts them.
    pub fn resolutions(&self) -> &[(u32, u32)] {
        &self.resolutions
    }

    /// Musubi's `get_bucket_resolution`: with `no_upscale` and an image no larger than the target
    /// area, the image's own size floored to 16 (which can be 0 for images under 16 pixels;
    /// callers refuse those); otherwise the bucket whose `w / h` is nearest the image's (first in
    /// sorted order on a tie, as numpy's `argmin`).
    pub fn bucket(&self, image_size: (u32, u32)) -> (u32, u32) {
        let (width, height) = image_size;
        if self.no_upscale && width as u64 * height as u64 <= self.area {
            return (
                divisible_by(width, RESOLUTION_STEPS),
                divisible_by(height, RESOLUTION_STEPS),
            );
        }
        let aspect_ratio = width as f64 / height as f64;
        let mut best = self.resolutions[0];
        let mut best_error = f64::INFINITY;
        for &(w, h) in &self.resolutions {
            let error = (w as f64 / h as f64 - aspect_ratio).abs();
            if error < best_error {
                best_error = error;
                best = (w, h);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 512x512, bucketing on: s = 512, min = 256; w = 256, 272, ..., 512 (17 widths) with
    /// h = floor16(262144 // w): 256->1024, 272->960 (963.7), 288->896 (910.2), 304->848 (862.3),
    /// 320->816 (819.2), 336->768 (780.2), 352->736 (744.7), 368->704 (712.3), 384->672 (682.7),
    /// 400->640 (655.4), 416->624 (630.2), 432->592 (606.8), 448->576 (585.1), 464->560 (565.0),
    /// 480->544 (546.1), 496->528 (528.5), 512->512. With transposes: 33 distinct buckets.
    #[test]
    fn buckets_of_512_square_follow_musubis_loop() {
        let selector = BucketSelector::new((512, 512), true, false);
        let r = selector.resolutions();
        assert_eq!(r.len(), 33);
        assert_eq!(r[0], (256, 1024));
        assert_eq!(r[32], (1024, 256));
        assert!(r.contains(&(512, 512)) && r.contains(&(528, 496)) && r.contains(&(960, 272)));
        assert!(r.windows(2).all(|p| p[0] < p[1]));
    }

    /// Bucketing off: one bucket, the resolution itself, whatever the image.
    #[test]
    fn without_bucketing_every_image_gets_the_resolution() {
        let selector = BucketSelector::new((960, 544), false, true);
        assert_eq!(selector.resolutions(), &[(960, 544)]);
        assert_eq!(selector.bucket((100, 3000)), (960, 544));
        // no_upscale is ignored when bucketing is off.
        assert_eq!(selector.bucket((64, 64)), (960, 544));
    }
}
