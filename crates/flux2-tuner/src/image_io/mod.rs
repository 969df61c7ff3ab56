//! Images in and out, as Musubi Tuner handles them: reading PNG/JPEG/WebP (EXIF orientation
//! applied, alpha dropped without compositing, greyscale and 16-bit converted to 8-bit RGB),
//! Musubi's bucket and control-image resizing (PIL Lanczos up, OpenCV area down, centre crop),
//! conversion to and from the AE's [-1, 1] tensors, and PNG output with the generation parameters
//! in text chunks, written atomically.

mod bucket;
mod read;
mod resize;
mod tensor;
mod write;

pub use bucket::{
    calculate_bucket_resolution, control_resolution_for_caching, divisible_by, resize_to_bucket,
    ControlResize, RESOLUTION_STEPS,
};
pub use image::RgbImage;
pub use read::read_rgb;
pub use resize::{resize_area, resize_lanczos};
pub use tensor::{image_to_tensor, tensor_to_image};
pub use write::{read_png_text, write_png};
