//! Image input/output: formats, orientation, channel conversions, [-1, 1] tensors, PNG text
//! chunks, and Musubi's resizes against reference bytes from Pillow 13 / OpenCV 5
//! (`tools/reference/image_resize.py`).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use flux2_tuner::image_io::{
    calculate_bucket_resolution, control_resolution_for_caching, image_to_tensor, read_png_text,
    read_rgb, resize_area, resize_lanczos, resize_to_bucket, tensor_to_image, write_png,
    ControlResize, RgbImage,
};
use image::{DynamicImage, ImageBuffer, Luma, Rgb, Rgba};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flux2-tuner-image-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The synthetic image of `tools/reference/image_resize.py`.
fn pattern(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let value =
            |c: u32| ((x * 37 + y * 91 + c * 53 + ((x * y) % 17) * 7 + (x * x) % 29) % 256) as u8;
        Rgb([value(0), value(1), value(2)])
    })
}

fn hex_bytes(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn resizes_match_pillow_and_opencv_byte_for_byte() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/image_resize_reference.json"
    );
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let size = |key: &str| {
            (
                case[key][0].as_u64().unwrap() as u32,
                case[key][1].as_u64().unwrap() as u32,
            )
        };
        let (source, target) = (size("source"), size("target"));
        let image = pattern(source.0, source.1);
        let output = match case["kind"].as_str().unwrap() {
            "lanczos" => resize_lanczos(&image, target.0, target.1),
            "area" => resize_area(&image, target.0, target.1).unwrap(),
            _ => resize_to_bucket(&image, target).unwrap(),
        };
        let expected = hex_bytes(case["rgb_hex"].as_str().unwrap());
        let differences: Vec<(usize, u8, u8)> = output
            .as_raw()
            .iter()
            .zip(&expected)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i, *a, *b))
            .collect();
        assert_eq!(output.dimensions(), target, "{case}");
        assert!(
            differences.is_empty(),
            "{} {:?} -> {:?}: {} of {} bytes differ, first (index, ours, reference) {:?}",
            case["kind"],
            source,
            target,
            differences.len(),
            expected.len(),
            &differences[..differences.len().min(5)]
        );
    }
}

#[test]
fn area_resize_refuses_upscaling() {
    assert!(resize_area(&pattern(8, 8), 9, 8).is_none());
}

#[test]
fn bucket_resolution_follows_musubi() {
    // Hand-derived: area 1024^2, ar 2 -> base 1440x720 (exact ar) among widths 1408..1472.
    assert_eq!(
        calculate_bucket_resolution((1000, 500), (1024, 1024), 16),
        (1440, 720)
    );
    // ar 1.5 -> base 1248x832, exact.
    assert_eq!(
        calculate_bucket_resolution((3000, 2000), (1024, 1024), 16),
        (1248, 832)
    );
    // Square stays square.
    assert_eq!(
        calculate_bucket_resolution((333, 333), (512, 512), 16),
        (512, 512)
    );

    let bucket = (768, 512);
    let none = ControlResize::default();
    assert_eq!(
        control_resolution_for_caching((1000, 700), bucket, none),
        bucket
    );
    let resolution = ControlResize {
        no_resize_control: false,
        control_resolution: Some((1024, 1024)),
    };
    assert_eq!(
        control_resolution_for_caching((3000, 2000), bucket, resolution),
        (1248, 832)
    );
    let own = ControlResize {
        no_resize_control: true,
        control_resolution: None,
    };
    assert_eq!(
        control_resolution_for_caching((1000, 701), bucket, own),
        (992, 688)
    );
    let both = ControlResize {
        no_resize_control: true,
        control_resolution: Some((1024, 1024)),
    };
    // Smaller than the cap: own size floored; larger: the cap's bucket.
    assert_eq!(
        control_resolution_for_caching((1000, 701), bucket, both),
        (992, 688)
    );
    assert_eq!(
        control_resolution_for_caching((3000, 2000), bucket, both),
        (1248, 832)
    );
}

#[test]
fn resize_to_bucket_crops_the_centre() {
    // A 4x2 image whose columns are 0, 1, 2, 3 scaled to a 2x2 bucket: scale 1 (height fits),
    // so no resampling at all and the centre columns 1 and 2 remain.
    let image = RgbImage::from_fn(4, 2, |x, _| Rgb([x as u8, 0, 0]));
    let cropped = resize_to_bucket(&image, (2, 2)).unwrap();
    let columns: Vec<u8> = cropped.pixels().map(|p| p[0]).collect();
    assert_eq!(columns, vec![1, 2, 1, 2]);
}

#[test]
fn formats_and_channel_layouts_are_read_as_rgb() {
    let dir = temp_dir("formats");
    // RGBA: alpha dropped, not composited.
    let rgba = ImageBuffer::from_fn(3, 2, |x, y| {
        Rgba([10 * x as u8, 20 * y as u8, 30, (x * 40) as u8])
    });
    let path = dir.join("rgba.png");
    DynamicImage::ImageRgba8(rgba).save(&path).unwrap();
    let read = read_rgb(&path).unwrap();
    assert_eq!(read.dimensions(), (3, 2));
    assert_eq!(read.get_pixel(2, 1).0, [20, 20, 30]);
    assert_eq!(read.get_pixel(0, 0).0, [0, 0, 30]);

    // 16-bit greyscale: v / 257 rounded, copied to the three channels.
    let grey16 = ImageBuffer::from_fn(3, 1, |x, _| Luma([[65535u16, 32896, 1000][x as usize]]));
    let path = dir.join("grey16.png");
    DynamicImage::ImageLuma16(grey16).save(&path).unwrap();
    let values: Vec<[u8; 3]> = read_rgb(&path).unwrap().pixels().map(|p| p.0).collect();
    assert_eq!(values, vec![[255; 3], [128; 3], [4; 3]]);

    // 8-bit greyscale.
    let grey = ImageBuffer::from_fn(2, 2, |x, y| Luma([(x * 100 + y * 7) as u8]));
    let path = dir.join("grey.png");
    DynamicImage::ImageLuma8(grey).save(&path).unwrap();
    assert_eq!(read_rgb(&path).unwrap().get_pixel(1, 1).0, [107; 3]);

    // Lossless WebP round trip; the format comes from the content, not the name.
    let original = pattern(9, 7);
    let path = dir.join("pattern.webp");
    DynamicImage::ImageRgb8(original.clone())
        .save(&path)
        .unwrap();
    let renamed = dir.join("pattern.png");
    std::fs::rename(&path, &renamed).unwrap();
    assert_eq!(read_rgb(&renamed).unwrap(), original);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A JPEG with an EXIF APP1 segment holding only `Orientation`.
fn jpeg_with_orientation(image: &RgbImage, orientation: u16) -> Vec<u8> {
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 100)
        .encode_image(image)
        .unwrap();
    let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
    exif.extend_from_slice(&orientation.to_be_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut segment = vec![0xFF, 0xE1];
    segment.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
    segment.extend_from_slice(&exif);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&segment);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn jpeg_exif_orientation_is_applied() {
    let dir = temp_dir("exif");
    // 32 wide, 16 tall: left half red, right half blue.
    let image = RgbImage::from_fn(32, 16, |x, _| {
        if x < 16 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let upright = dir.join("upright.jpg");
    std::fs::write(&upright, jpeg_with_orientation(&image, 1)).unwrap();
    let read = read_rgb(&upright).unwrap();
    assert_eq!(read.dimensions(), (32, 16));
    // Orientation 6: shown rotated 90 degrees clockwise, so the left (red) half is on top.
    let rotated = dir.join("rotated.jpg");
    std::fs::write(&rotated, jpeg_with_orientation(&image, 6)).unwrap();
    let read = read_rgb(&rotated).unwrap();
    assert_eq!(read.dimensions(), (16, 32));
    let top = read.get_pixel(8, 4).0;
    let bottom = read.get_pixel(8, 27).0;
    assert!(top[0] > 240 && top[2] < 15, "{top:?}");
    assert!(bottom[2] > 240 && bottom[0] < 15, "{bottom:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unreadable_files_are_named_in_errors() {
    let dir = temp_dir("errors");
    let missing = dir.join("missing.png");
    let message = read_rgb(&missing).unwrap_err().to_string();
    assert!(message.contains("missing.png"), "{message}");
    let garbage = dir.join("garbage.bin");
    std::fs::write(&garbage, b"this is not an image at all").unwrap();
    let message = read_rgb(&garbage).unwrap_err().to_string();
    assert!(
        message.contains("garbage.bin") && message.contains("not a PNG"),
        "{message}"
    );
    // With an image extension the decoder for that format reports the damage.
    let garbage = dir.join("garbage.jpg");
    std::fs::write(&garbage, b"this is not an image at all").unwrap();
    let message = read_rgb(&garbage).unwrap_err().to_string();
    assert!(
        message.contains("garbage.jpg") && message.contains("cannot decode"),
        "{message}"
    );
    let truncated = dir.join("truncated.png");
    let mut bytes = Vec::new();
    DynamicImage::ImageRgb8(pattern(20, 20))
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let message = read_rgb(&truncated).unwrap_err().to_string();
    assert!(message.contains("truncated.png"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tensors_map_bytes_to_minus_one_one_and_back() {
    let image = RgbImage::from_fn(2, 1, |x, _| {
        if x == 0 {
            Rgb([0, 127, 255])
        } else {
            Rgb([1, 128, 254])
        }
    });
    let tensor = image_to_tensor(&image, &Device::Cpu).unwrap();
    assert_eq!(tensor.dims(), &[1, 3, 1, 2]);
    let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // Layout [c][x]: red 0, 1; green 127, 128; blue 255, 254, each v / 127.5 - 1.
    let expected: Vec<f32> = [0u8, 1, 127, 128, 255, 254]
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    assert_eq!(values, expected);
    // Back through Musubi's truncating conversion: 1 becomes (1/127.5 - 1 + 1)/2*255 =
    // 0.99999994 in f32 and truncates to 0; the others survive.
    let back: Vec<u8> = tensor_to_image(&tensor).unwrap().into_raw();
    assert_eq!(back, vec![0, 127, 255, 0, 128, 254]);

    // Out-of-range values clamp; fractions truncate (Musubi's astype(uint8)).
    let decoded = Tensor::new(
        &[[[-1.5f32, 0.999]], [[0.0, 2.0]], [[-0.999, 1.0]]],
        &Device::Cpu,
    )
    .unwrap();
    let image = tensor_to_image(&decoded).unwrap();
    let bytes: Vec<[u8; 3]> = image.pixels().map(|p| p.0).collect();
    // 0.999 -> 0.9995 * 255 = 254.87 -> 254; 0 -> 127.5 -> 127; -0.999 -> 0.1275 -> 0.
    assert_eq!(bytes, vec![[0, 127, 0], [254, 255, 255]]);
}

#[test]
fn png_output_carries_the_parameters_and_is_atomic() {
    let dir = temp_dir("png");
    let path = dir.join("out.png");
    let image = pattern(12, 5);
    let text = vec![
        (
            "parameters".to_string(),
            "prompt: a cat; seed: 42; steps: 28".to_string(),
        ),
        ("prompt".to_string(), "un chat noir, 黒猫".to_string()),
    ];
    write_png(&path, &image, &text).unwrap();
    assert_eq!(read_rgb(&path).unwrap(), image);
    assert_eq!(read_png_text(&path).unwrap(), text);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["out.png".to_string()]);

    let message = write_png(&dir.join("bad.png"), &image, &[("".into(), "x".into())])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("bad.png") && message.contains("keyword"),
        "{message}"
    );
    assert!(!dir.join("bad.png").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
