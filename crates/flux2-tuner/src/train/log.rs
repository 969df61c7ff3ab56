//! Training logs: TensorBoard event files (scalars and histograms, written by hand: a record is
//! `length, masked crc32c(length), Event protobuf, masked crc32c(data)`) and a JSONL file with
//! one line per step. Both are flushed after every step so a crash loses at most one line.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const CRC32C_POLY: u32 = 0x82F6_3B78;

/// CRC-32C (Castagnoli), as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC32C_POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

/// Protobuf encoding helpers (only what an Event needs).
fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn field_double(field: u32, value: f64, out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 1), out);
    out.extend_from_slice(&value.to_le_bytes());
}

fn field_float(field: u32, value: f32, out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 5), out);
    out.extend_from_slice(&value.to_le_bytes());
}

fn field_varint(field: u32, value: u64, out: &mut Vec<u8>) {
    varint(u64::from(field << 3), out);
    varint(value, out);
}

fn packed_doubles(field: u32, values: &[f64], out: &mut Vec<u8>) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    field_bytes(field, &bytes, out);
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One summary value of an event.
pub enum SummaryValue<'a> {
    Scalar(&'a str, f32),
    Histogram(&'a str, &'a [f64]),
}

fn encode_value(value: &SummaryValue, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    match value {
        SummaryValue::Scalar(tag, v) => {
            field_bytes(1, tag.as_bytes(), &mut body);
            field_float(2, *v, &mut body);
        }
        SummaryValue::Histogram(tag, values) => {
            field_bytes(1, tag.as_bytes(), &mut body);
            let mut histogram = Vec::new();
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            field_double(1, if values.is_empty() { 0.0 } else { min }, &mut histogram);
            field_double(2, if values.is_empty() { 0.0 } else { max }, &mut histogram);
            field_double(3, values.len() as f64, &mut histogram);
            field_double(4, values.iter().sum(), &mut histogram);
            field_double(5, values.iter().map(|v| v * v).sum(), &mut histogram);
            // 20 equal buckets over [0, 1] (timesteps live there); TensorBoard reads the right edges.
            let edges: Vec<f64> = (1..=20).map(|i| i as f64 / 20.0).collect();
            let mut counts = vec![0f64; edges.len()];
            for v in values.iter() {
                let index = edges.iter().position(|e| v <= e).unwrap_or(edges.len() - 1);
                counts[index] += 1.0;
            }
            packed_doubles(6, &edges, &mut histogram);
            packed_doubles(7, &counts, &mut histogram);
            field_bytes(5, &histogram, &mut body);
        }
    }
    field_bytes(1, &body, out);
}

/// Writes TensorBoard events and a JSONL log into a folder.
pub struct TrainingLog {
    events: File,
    jsonl: File,
    pub events_path: PathBuf,
    pub jsonl_path: PathBuf,
}

impl TrainingLog {
    /// Creates `{dir}/events.out.tfevents.{time}.flux2-tuner` and `{dir}/{name}.jsonl` (appended
    /// to when resuming).
    pub fn create(directory: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(directory)
            .map_err(|e| Error::io(directory, "cannot create the log folder", e))?;
        let events_path = directory.join(format!(
            "events.out.tfevents.{}.flux2-tuner",
            wall_time() as u64
        ));
        let events =
            File::create(&events_path).map_err(|e| Error::io(&events_path, "cannot create", e))?;
        let jsonl_path = directory.join(format!("{name}.jsonl"));
        let jsonl = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jsonl_path)
            .map_err(|e| Error::io(&jsonl_path, "cannot open", e))?;
        let mut log = Self {
            events,
            jsonl,
            events_path,
            jsonl_path,
        };
        let mut first = Vec::new();
        field_double(1, wall_time(), &mut first);
        field_bytes(3, b"brain.Event:2", &mut first);
        log.write_record(&first)?;
        Ok(log)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let length = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&length);
        record.extend_from_slice(&masked_crc(&length).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.events
            .write_all(&record)
            .and_then(|()| self.events.flush())
            .map_err(|e| Error::io(&self.events_path, "cannot write", e))
    }

    /// Logs values at `step` to both files.
    pub fn log(&mut self, step: usize, values: &[SummaryValue]) -> Result<()> {
        let mut summary = Vec::new();
        for value in values {
            encode_value(value, &mut summary);
        }
        let mut event = Vec::new();
        field_double(1, wall_time(), &mut event);
        field_varint(2, step as u64, &mut event);
        field_bytes(5, &summary, &mut event);
        self.write_record(&event)?;
        let mut line = serde_json::Map::new();
        line.insert("step".into(), step.into());
        for value in values {
            match value {
                SummaryValue::Scalar(tag, v) => {
                    line.insert((*tag).to_string(), serde_json::json!(v));
                }
                SummaryValue::Histogram(tag, v) => {
                    line.insert((*tag).to_string(), serde_json::json!(v));
                }
            }
        }
        writeln!(self.jsonl, "{}", serde_json::Value::Object(line))
            .and_then(|()| self.jsonl.flush())
            .map_err(|e| Error::io(&self.jsonl_path, "cannot write", e))
    }
}

/// A decoded scalar of an event file (for tests and tools).
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarRecord {
    pub step: u64,
    pub tag: String,
    pub value: f32,
}

fn read_varint(data: &[u8], position: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let byte = *data.get(*position)?;
        *position += 1;
        value |= u64::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
    }
}

/// Iterates `(field, wire type, payload)` of a protobuf message.
fn fields(data: &[u8]) -> Option<Vec<(u32, u8, &[u8])>> {
    let mut out = Vec::new();
    let mut position = 0;
    while position < data.len() {
        let key = read_varint(data, &mut position)?;
        let (field, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let start = position;
        match wire {
            0 => {
                read_varint(data, &mut position)?;
            }
            1 => position += 8,
            5 => position += 4,
            2 => {
                let length = read_varint(data, &mut position)? as usize;
                let start = position;
                position += length;
                out.push((field, wire, data.get(start..position)?));
                continue;
            }
            _ => return None,
        }
        out.push((field, wire, data.get(start..position)?));
    }
    Some(out)
}

/// Reads every scalar of an event file back, checking every record's checksums.
pub fn read_scalars(path: &Path) -> Result<Vec<ScalarRecord>> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, "cannot read", e))?;
    let bad = |what: &str| Error::InvalidConfig {
        path: path.to_path_buf(),
        message: format!("not a valid event file: {what}"),
    };
    let mut scalars = Vec::new();
    let mut position = 0;
    while position < data.len() {
        let length_bytes = data
            .get(position..position + 8)
            .ok_or_else(|| bad("truncated length"))?;
        let length =
            u64::from_le_bytes(length_bytes.try_into().map_err(|_| bad("length"))?) as usize;
        let crc = data
            .get(position + 8..position + 12)
            .ok_or_else(|| bad("truncated"))?;
        if u32::from_le_bytes(crc.try_into().map_err(|_| bad("crc"))?) != masked_crc(length_bytes) {
            return Err(bad("length checksum"));
        }
        let body = data
            .get(position + 12..position + 12 + length)
            .ok_or_else(|| bad("truncated record"))?;
        let crc = data
            .get(position + 12 + length..position + 16 + length)
            .ok_or_else(|| bad("truncated"))?;
        if u32::from_le_bytes(crc.try_into().map_err(|_| bad("crc"))?) != masked_crc(body) {
            return Err(bad("data checksum"));
        }
        position += 16 + length;
        let event = fields(body).ok_or_else(|| bad("event protobuf"))?;
        let step = event
            .iter()
            .find(|(f, w, _)| *f == 2 && *w == 0)
            .and_then(|(_, _, p)| read_varint(p, &mut 0))
            .unwrap_or(0);
        for (_, _, summary) in event.iter().filter(|(f, w, _)| *f == 5 && *w == 2) {
            for (_, _, value) in fields(summary)
                .ok_or_else(|| bad("summary"))?
                .into_iter()
                .filter(|(f, _, _)| *f == 1)
            {
                let parts = fields(value).ok_or_else(|| bad("value"))?;
                let tag = parts
                    .iter()
                    .find(|(f, _, _)| *f == 1)
                    .map(|(_, _, p)| String::from_utf8_lossy(p).into_owned());
                let scalar = parts
                    .iter()
                    .find(|(f, w, _)| *f == 2 && *w == 5)
                    .and_then(|(_, _, p)| Some(f32::from_le_bytes((*p).try_into().ok()?)));
                if let (Some(tag), Some(value)) = (tag, scalar) {
                    scalars.push(ScalarRecord { step, tag, value });
                }
            }
        }
    }
    Ok(scalars)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC-32C check value of "123456789" (RFC 3720).
    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn event_files_read_back() {
        let dir = std::env::temp_dir().join(format!("flux2-log-{}", std::process::id()));
        let mut log = TrainingLog::create(&dir, "run").unwrap();
        log.log(
            1,
            &[
                SummaryValue::Scalar("loss/current", 0.5),
                SummaryValue::Histogram("timesteps", &[0.1, 0.9]),
            ],
        )
        .unwrap();
        log.log(2, &[SummaryValue::Scalar("loss/current", 0.25)])
            .unwrap();
        let scalars = read_scalars(&log.events_path).unwrap();
        assert_eq!(
            scalars,
            vec![
                ScalarRecord {
                    step: 1,
                    tag: "loss/current".into(),
                    value: 0.5
                },
                ScalarRecord {
                    step: 2,
                    tag: "loss/current".into(),
                    value: 0.25
                },
            ]
        );
        let lines = std::fs::read_to_string(&log.jsonl_path).unwrap();
        assert_eq!(lines.lines().count(), 2);
        assert!(lines.contains("\"timesteps\":[0.1,0.9]"));
    }
}
