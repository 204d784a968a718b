//! TensorBoard event files (`RUN/tb/events.out.tfevents.*`): what TensorBoard, W&B's
//! `sync --sync-tensorboard` and every tool built on TensorFlow's summary format read.
//!
//! A file is a sequence of TFRecords (`u64` length, masked CRC-32C of the length, the
//! bytes, masked CRC-32C of the bytes; TensorFlow's `record_writer.cc`), each an `Event`
//! protocol buffer (`tensorflow/core/util/event.proto`, `summary.proto`): the first says
//! the file version (`brain.Event:2`), the others hold scalars (`simple_value`), a PNG
//! image or a text (a string tensor for the `text` plugin), or a `SessionLog.START` — the
//! mark TensorBoard purges on: after a restart at step S, every event of an earlier file
//! with step ≥ S is superseded, so a resumed run shows one value per step. The messages
//! are encoded with `prost` from the few fields below (no `protoc`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;

use crate::error::{Context, Result};

/// `RUN/tb`: the run's TensorBoard log folder (`tensorboard --logdir RUN/tb`).
pub fn tb_dir(run: &Path) -> PathBuf {
    run.join("tb")
}

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
    #[prost(oneof = "Kind", tags = "2, 4, 8")]
    kind: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Image {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

/// `DT_STRING` in `types.proto`.
const DT_STRING: i32 = 7;

#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Dim {
    #[prost(int64, tag = "1")]
    size: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

/// `SessionLog.START` in `event.proto`.
const SESSION_START: i32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
    #[prost(string, tag = "2")]
    checkpoint_path: String,
    #[prost(string, tag = "3")]
    msg: String,
}

/// TFRecord's masked CRC-32C (`tensorflow/core/lib/hash/crc32c.h`: rotate right by 15
/// and add a constant).
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// Files made by this process, for unique names within a second.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Appends events to a new file in `RUN/tb` (rank 0 of a run only).
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file `RUN/tb/events.out.tfevents.SECONDS.MICROS.byol.PID.N` (the
    /// folder made when missing; names sort in the order they were made, which is the
    /// order TensorBoard reads them in), starting with the file-version event.
    ///
    /// # Errors
    /// The folder or file cannot be made or written, naming it.
    pub fn create(run: &Path) -> Result<EventWriter> {
        let dir = tb_dir(run);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.{:06}.byol.{}.{n:04}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id()
        ));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter { file, path };
        w.write(0, What::FileVersion("brain.Event:2".into()))?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, step: u64, what: What) -> Result<()> {
        let wall_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let ev = Event {
            wall_time,
            step: step as i64,
            what: Some(what),
        };
        self.file
            .write_all(&record(&ev.encode_to_vec()))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn summary(&mut self, step: u64, value: Vec<Value>) -> Result<()> {
        self.write(step, What::Summary(Summary { value }))
    }

    /// Marks a (re)start at `step`: TensorBoard drops the events of earlier files with a
    /// step ≥ `step` (rows an interrupted attempt wrote after its last checkpoint).
    ///
    /// # Errors
    /// The write failed, naming the file.
    pub fn restart(&mut self, step: u64) -> Result<()> {
        let log = SessionLog {
            status: SESSION_START,
            ..SessionLog::default()
        };
        self.write(step, What::SessionLog(log))
    }

    /// Scalars `(tag, value)` at `step` (as `float`, TensorBoard's scalar type), in one
    /// event.
    ///
    /// # Errors
    /// The write failed, naming the file.
    pub fn scalars(&mut self, step: u64, scalars: &[(String, f64)]) -> Result<()> {
        let value = scalars
            .iter()
            .map(|(tag, v)| Value {
                tag: tag.clone(),
                metadata: None,
                kind: Some(Kind::SimpleValue(*v as f32)),
            })
            .collect();
        self.summary(step, value)
    }

    /// A PNG image of `height` × `width` RGB pixels under `tag` at `step`.
    ///
    /// # Errors
    /// The write failed, naming the file.
    pub fn png(
        &mut self,
        step: u64,
        tag: &str,
        png: Vec<u8>,
        (height, width): (u32, u32),
    ) -> Result<()> {
        let image = Image {
            height: height as i32,
            width: width as i32,
            colorspace: 3,
            encoded_image_string: png,
        };
        self.summary(
            step,
            vec![Value {
                tag: tag.into(),
                metadata: None,
                kind: Some(Kind::Image(image)),
            }],
        )
    }

    /// A text (Markdown, as TensorBoard's text plugin shows it) under `tag` at `step`.
    ///
    /// # Errors
    /// The write failed, naming the file.
    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        let tensor = TensorProto {
            dtype: DT_STRING,
            tensor_shape: Some(TensorShape {
                dim: vec![Dim { size: 1 }],
            }),
            string_val: vec![text.as_bytes().to_vec()],
        };
        let metadata = SummaryMetadata {
            plugin_data: Some(PluginData {
                plugin_name: "text".into(),
                content: Vec::new(),
            }),
        };
        self.summary(
            step,
            vec![Value {
                tag: tag.into(),
                metadata: Some(metadata),
                kind: Some(Kind::Tensor(tensor)),
            }],
        )
    }
}

/// The numbers of a metrics row as scalars: every numeric field but `step` and `epoch`,
/// tagged with its name in `metrics.jsonl`.
pub fn row_scalars(row: &serde_json::Value) -> Vec<(String, f64)> {
    row.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.as_str() != "step" && k.as_str() != "epoch")
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// PNG bytes of an RGB image given as `[3, H, W]` `uint8` pixels, row-major per channel.
///
/// # Errors
/// The buffer is not 3 × H × W bytes, or the encoder failed.
pub fn encode_png(chw: &[u8], height: u32, width: u32) -> Result<Vec<u8>> {
    let plane = (height * width) as usize;
    if chw.len() != 3 * plane {
        crate::bail!("{} bytes are not a 3 × {height} × {width} image", chw.len());
    }
    let mut rgb = Vec::with_capacity(3 * plane);
    for i in 0..plane {
        rgb.extend_from_slice(&[chw[i], chw[plane + i], chw[2 * plane + i]]);
    }
    match crate::plot::encode_rgb_png(&rgb, width, height) {
        Ok(png) => Ok(png),
        Err(e) => crate::bail!("encoding a PNG: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C is the Castagnoli CRC (RFC 3720's check value); the whole framing is
    /// checked by TensorBoard's own reader in the integration tests.
    #[test]
    fn the_crc_is_crc32c() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(record(b"ab").len(), 8 + 4 + 2 + 4);
    }
}
