//! TensorBoard scalars: the rows of a stage's `metrics.jsonl`, also written as a TensorBoard
//! event file beside it, so that `tensorboard --logdir checkpoints/` shows every run (each
//! stage folder is a TensorBoard run).
//!
//! The format, stated here so that nothing else is needed to read it (TensorFlow's
//! `tensorflow/core/lib/io/record_writer.cc` and `tensorflow/core/util/event.proto`):
//! - the file is a sequence of records, each `length: u64 LE`, `masked_crc(length bytes):
//!   u32 LE`, `data`, `masked_crc(data): u32 LE`, where `masked_crc(x) = rotr15(crc32c(x)) +
//!   0xa282ead8` (CRC-32C, the Castagnoli polynomial);
//! - each record is a protobuf `Event`: `wall_time` (field 1, double), `step` (2, int64), and
//!   either `file_version` (3, string, `"brain.Event:2"` in the first record) or `summary` (5),
//!   a `Summary` whose repeated `value` (1) each hold a `tag` (1, string) and a
//!   `simple_value` (2, float);
//! - TensorBoard reads files whose name contains `tfevents`.
//!
//! Only what scalars need is written; [`read_scalars`] reads it back (tests, tools).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The event file's name prefix (TensorBoard looks for `tfevents`).
pub const EVENT_FILE_PREFIX: &str = "events.out.tfevents.";

/// One event of scalars: its step, wall time (seconds since the Unix epoch) and `(tag, value)`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalarEvent {
    pub step: i64,
    pub wall_time: f64,
    pub values: Vec<(String, f32)>,
}

/// Appends scalar events to one event file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Starts a new event file in `dir`, named after `wall_time`, after removing the event files
    /// an earlier writer left there (a resumed run rewrites its scalars from `metrics.jsonl`, so
    /// one file holds them all and none twice).
    pub fn create(dir: &Path, wall_time: f64) -> io::Result<Self> {
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(EVENT_FILE_PREFIX) && entry.path().is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        let path = dir.join(format!(
            "{EVENT_FILE_PREFIX}{}.simclr-rs",
            wall_time.max(0.0) as u64
        ));
        let file = File::create(&path)?;
        let mut w = EventWriter { file, path };
        let mut event = Vec::new();
        put_wall_time(&mut event, wall_time);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event holding every `(tag, value)` at `step`.
    pub fn scalars(&mut self, event: &ScalarEvent) -> io::Result<()> {
        let mut summary = Vec::new();
        for (tag, value) in &event.values {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_bytes());
            put_key(&mut v, 2, 5);
            v.extend_from_slice(&value.to_le_bytes());
            put_bytes(&mut summary, 1, &v);
        }
        // As protobuf serialises them: a zero wall time or step is left out (proto3 defaults).
        let mut e = Vec::new();
        put_wall_time(&mut e, event.wall_time);
        if event.step != 0 {
            put_key(&mut e, 2, 0);
            put_varint(&mut e, event.step as u64);
        }
        put_bytes(&mut e, 5, &summary);
        self.record(&e)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }

    fn record(&mut self, data: &[u8]) -> io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&buf)
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, ((field << 3) | wire) as u64);
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_wall_time(out: &mut Vec<u8>, v: f64) {
    if v != 0.0 {
        put_key(out, 1, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Why an event file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EventFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {what} at byte {offset}")]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        offset: usize,
    },
}

/// The scalar events of the event file at `path`, in file order, checking every record's
/// checksums (the file-version record is skipped).
pub fn read_scalars(path: &Path) -> Result<Vec<ScalarEvent>, EventFileError> {
    let bytes = std::fs::read(path).map_err(|source| EventFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |what, offset| EventFileError::Corrupt {
        path: path.to_path_buf(),
        what,
        offset,
    };
    let mut events = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + 12)
            .ok_or(corrupt("truncated header", at))?;
        let len = u64::from_le_bytes(head[..8].try_into().unwrap());
        if u32::from_le_bytes(head[8..].try_into().unwrap()) != masked_crc(&head[..8]) {
            return Err(corrupt("length checksum mismatch", at));
        }
        let len = usize::try_from(len).map_err(|_| corrupt("record too long", at))?;
        let end = (at + 12)
            .checked_add(len)
            .and_then(|e| e.checked_add(4))
            .ok_or(corrupt("record too long", at))?;
        let rec = bytes
            .get(at + 12..end)
            .ok_or(corrupt("truncated record", at))?;
        let (data, crc) = rec.split_at(len);
        if u32::from_le_bytes(crc.try_into().unwrap()) != masked_crc(data) {
            return Err(corrupt("data checksum mismatch", at));
        }
        if let Some(e) = parse_event(data).ok_or(corrupt("malformed event", at))? {
            events.push(e);
        }
        at = end;
    }
    Ok(events)
}

/// A protobuf field: `(number, value)`.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn fields(mut b: &[u8]) -> Option<Vec<(u32, Field<'_>)>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let field = u32::try_from(key >> 3).ok()?;
        let value = match key & 7 {
            0 => Field::Varint(varint(&mut b)?),
            1 => {
                let (v, rest) = b.split_at_checked(8)?;
                b = rest;
                Field::Fixed64(v.try_into().ok()?)
            }
            2 => {
                let len = usize::try_from(varint(&mut b)?).ok()?;
                let (v, rest) = b.split_at_checked(len)?;
                b = rest;
                Field::Bytes(v)
            }
            5 => {
                let (v, rest) = b.split_at_checked(4)?;
                b = rest;
                Field::Fixed32(v.try_into().ok()?)
            }
            _ => return None,
        };
        out.push((field, value));
    }
    Some(out)
}

/// `Some(event)` for a summary event, `None` for another kind (the file version).
fn parse_event(data: &[u8]) -> Option<Option<ScalarEvent>> {
    let mut event = ScalarEvent {
        step: 0,
        wall_time: 0.0,
        values: Vec::new(),
    };
    let mut summary = false;
    for (n, f) in fields(data)? {
        match (n, f) {
            (1, Field::Fixed64(v)) => event.wall_time = f64::from_le_bytes(v),
            (2, Field::Varint(v)) => event.step = v as i64,
            (5, Field::Bytes(s)) => {
                summary = true;
                for (n, f) in fields(s)? {
                    let (1, Field::Bytes(value)) = (n, f) else {
                        continue;
                    };
                    let (mut tag, mut simple) = (None, None);
                    for (n, f) in fields(value)? {
                        match (n, f) {
                            (1, Field::Bytes(t)) => tag = Some(String::from_utf8(t.to_vec()).ok()?),
                            (2, Field::Fixed32(v)) => simple = Some(f32::from_le_bytes(v)),
                            _ => {}
                        }
                    }
                    event.values.push((tag?, simple?));
                }
            }
            _ => {}
        }
    }
    Some(summary.then_some(event))
}
