//! Dataset discovery as Musubi's datasources: which images count, how control images are matched
//! and ordered, JSONL parsing, and the errors that name the file.

use std::path::{Path, PathBuf};

use flux2_tuner::data::{discover_items, ConfigFallbacks, DatasetConfig};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flux2-data-source-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn touch(path: &Path) {
    std::fs::write(path, b"").unwrap();
}

fn config(root: &Path, body: &str) -> DatasetConfig {
    let path = root.join("dataset.toml");
    std::fs::write(&path, body).unwrap();
    DatasetConfig::load(&path, &ConfigFallbacks::default()).unwrap()
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn directory_items_and_their_controls_follow_musubis_matching() {
    let root = temp_dir("directory");
    let images = root.join("images");
    let controls = root.join("controls");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&controls).unwrap();
    // Kept: images with a caption. `.PNG` is one of Musubi's extensions, `.Png` is not; hidden
    // files and images without a caption are not items.
    for name in [
        "img1.png",
        "img10.PNG",
        "cat_1.jpg",
        "odd.Png",
        ".hidden.png",
        "nocap.png",
    ] {
        touch(&images.join(name));
    }
    for name in [
        "img1.txt",
        "img10.txt",
        "cat_1.txt",
        "odd.txt",
        ".hidden.txt",
    ] {
        std::fs::write(images.join(name), format!("\n caption of {name} \n")).unwrap();
    }
    // img10 (longer name) is matched first and takes img10.*; img1 then gets img1_*; the exact
    // stem sorts first, then numeric suffixes (_0000 = 0 < _2).
    for name in [
        "img10.png",
        "img10_1.webp",
        "img1_2.png",
        "img1_0000.jpg",
        "img1.png",
        "cat_1_0.png",
    ] {
        touch(&controls.join(name));
    }
    let config = config(
        &root,
        &format!(
            "[[datasets]]\nimage_directory = \"{}\"\ncontrol_directory = \"{}\"\ncaption_extension = \".txt\"\n",
            images.display(),
            controls.display()
        ),
    );
    let items = discover_items(&config.datasets[0]).unwrap();
    let listed: Vec<(String, String, Vec<String>)> = items
        .iter()
        .map(|item| {
            (
                item.stem(),
                item.caption.clone(),
                names(&item.control_paths),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (
                "cat_1".to_string(),
                "caption of cat_1.txt".to_string(),
                vec!["cat_1_0.png".to_string()]
            ),
            (
                "img1".to_string(),
                "caption of img1.txt".to_string(),
                vec![
                    "img1.png".to_string(),
                    "img1_0000.jpg".to_string(),
                    "img1_2.png".to_string()
                ]
            ),
            (
                "img10".to_string(),
                "caption of img10.txt".to_string(),
                vec!["img10.png".to_string(), "img10_1.webp".to_string()]
            ),
        ]
    );
}

#[test]
fn control_naming_errors_name_the_file() {
    let root = temp_dir("control-errors");
    let images = root.join("images");
    let controls = root.join("controls");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&controls).unwrap();
    touch(&images.join("a.png"));
    std::fs::write(images.join("a.txt"), "a").unwrap();
    touch(&images.join("b.png"));
    std::fs::write(images.join("b.txt"), "b").unwrap();
    touch(&controls.join("a_ref.png"));
    let body = format!(
        "[[datasets]]\nimage_directory = \"{}\"\ncontrol_directory = \"{}\"\ncaption_extension = \".txt\"\n",
        images.display(),
        controls.display()
    );
    let config = config(&root, &body);
    let error = discover_items(&config.datasets[0]).unwrap_err().to_string();
    assert!(
        error.contains("a_ref.png") && error.contains("non-numeric suffix `ref`"),
        "{error}"
    );
    std::fs::remove_file(controls.join("a_ref.png")).unwrap();
    touch(&controls.join("a_0.png"));
    let error = discover_items(&config.datasets[0]).unwrap_err().to_string();
    assert!(
        error.contains("b.png") && error.contains("no control image"),
        "{error}"
    );

    let no_extension = format!("[[datasets]]\nimage_directory = \"{}\"\n", images.display());
    let config = self::config(&root, &no_extension);
    let error = discover_items(&config.datasets[0]).unwrap_err().to_string();
    assert!(error.contains("caption_extension"), "{error}");
}

#[test]
fn jsonl_items_renumber_controls_and_report_bad_lines() {
    let root = temp_dir("jsonl");
    let jsonl = root.join("meta.jsonl");
    std::fs::write(
        &jsonl,
        concat!(
            r#"{"image_path": "/data/x/one.png", "caption": "first", "control_path_0001": "/c/b.png", "control_path_0000": "/c/a.png"}"#,
            "\n\n",
            r#"{"image_path": "/data/y/two.jpg", "caption": "second", "control_path": "/c/only.png"}"#,
            "\n",
            r#"{"image_path": "/data/z/three.png", "caption": "no controls"}"#,
            "\n"
        ),
    )
    .unwrap();
    let body = format!(
        "[[datasets]]\nimage_jsonl_file = \"{}\"\ncache_directory = \"{}\"\n",
        jsonl.display(),
        root.join("cache").display()
    );
    let config = config(&root, &body);
    let items = discover_items(&config.datasets[0]).unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].stem(), "one");
    assert_eq!(
        items[0].control_paths,
        [PathBuf::from("/c/a.png"), PathBuf::from("/c/b.png")]
    );
    assert_eq!(items[1].control_paths, [PathBuf::from("/c/only.png")]);
    assert_eq!(items[1].caption, "second");
    assert!(items[2].control_paths.is_empty());

    std::fs::write(&jsonl, "{\"image_path\": \"/a.png\"}\n").unwrap();
    let error = discover_items(&config.datasets[0]).unwrap_err().to_string();
    assert!(
        error.contains("meta.jsonl") && error.contains("line 1") && error.contains("`caption`"),
        "{error}"
    );
}
