//! Loading releases each tensor's mapped pages once it is copied (issue 9 point 5), so that a load
//! holds one copy of the weights: tensors sharing a page still read back exactly, repeatedly and in
//! any order, and a large tensor's pages do not stay in the process's resident set.

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::{save_safetensors, Checkpoint};

/// `RssFile` of `/proc/self/status` in bytes (file pages mapped by this process).
fn mapped_file_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
    let kilobytes: u64 = line
        .trim_start_matches("RssFile:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kilobytes * 1024
}

#[test]
fn released_pages_read_back_and_leave_the_resident_set() {
    let dir = std::env::temp_dir().join(format!("flux2-load-release-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("weights.safetensors");
    // Ten 300-byte tensors share pages; the last one is 64 MiB of f32.
    let mut tensors = Vec::new();
    for index in 0..10 {
        let values: Vec<f32> = (0..75).map(|i| (index * 100 + i) as f32).collect();
        tensors.push((
            format!("small.{index}"),
            Tensor::from_vec(values, 75, &Device::Cpu).unwrap(),
        ));
    }
    let large = 16 << 20;
    let values: Vec<f32> = (0..large).map(|i| (i % 1000) as f32).collect();
    tensors.push((
        "large".to_string(),
        Tensor::from_vec(values, large, &Device::Cpu).unwrap(),
    ));
    save_safetensors(&path, &tensors, None).unwrap();

    let checkpoint = Checkpoint::open(&path).unwrap();
    let before = mapped_file_bytes();
    let loaded = checkpoint.load("large", DType::F32, &Device::Cpu).unwrap();
    let grown = mapped_file_bytes().saturating_sub(before);
    assert!(
        grown < 8 << 20,
        "{grown} bytes of the 64 MiB tensor's file pages stayed mapped"
    );
    assert_eq!(
        loaded.sum_all().unwrap().to_scalar::<f32>().unwrap(),
        tensors[10].1.sum_all().unwrap().to_scalar::<f32>().unwrap()
    );
    // Forwards, backwards and again: each small tensor is exact although its neighbours' pages
    // were released after their loads.
    for order in [
        (0..10).collect::<Vec<_>>(),
        (0..10).rev().collect(),
        vec![3, 3, 7, 0, 9],
    ] {
        for index in order {
            let values: Vec<f32> = checkpoint
                .load(&format!("small.{index}"), DType::F32, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap();
            let expected: Vec<f32> = (0..75).map(|i| (index * 100 + i) as f32).collect();
            assert_eq!(values, expected);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
