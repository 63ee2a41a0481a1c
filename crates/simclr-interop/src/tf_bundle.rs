//! TensorFlow's tensor-bundle checkpoint format, read (and written) without TensorFlow.
//!
//! A bundle with prefix `P` is `P.index` plus the data shards
//! `P.data-{shard:05}-of-{num_shards:05}`; TF1's `Saver` (op `SaveV2`) writes
//! `model.ckpt-<step>.index` and `model.ckpt-<step>.data-00000-of-00001`.
//!
//! * **The index** is a LevelDB-style sorted table (SSTable). Its last 48 bytes are the
//!   footer: the metaindex and index block handles (each a varint offset and a varint size),
//!   zero padding to 40 bytes, then the 8-byte little-endian magic
//!   `0xdb4775248b80fb57`. The index block maps a separator key to the handle of each data
//!   block. Every block is followed by a 5-byte trailer: a compression byte (0 = none,
//!   1 = snappy; TF writes bundle indexes uncompressed, and compressed blocks are refused
//!   here with [`TfBundleError::Compressed`]) and the masked CRC32C of the block and that
//!   byte. A block is a run of entries `varint shared, varint non_shared, varint value_len,
//!   key suffix, value` (each key shares `shared` leading bytes with the previous one),
//!   followed by the restart offsets (`u32` each) and their count (`u32`).
//! * **The entries.** The empty key holds a `BundleHeaderProto` (`num_shards`,
//!   `endianness`, `version`); every other key is a tensor name whose value is a
//!   `BundleEntryProto` (`dtype`, `shape`, `shard_id`, `offset`, `size`, `crc32c`, `slices`).
//!   Both are decoded by hand from the protobuf wire format (only the fields needed).
//! * **The data shards** hold each tensor's raw bytes (little-endian, row-major) at
//!   `offset..offset + size`. `crc32c` is the masked CRC32C of those bytes, checked on every
//!   read.
//!
//! [`TfBundle`] reads a bundle; `write_bundle` (feature `bundle-writer`) writes a single-shard one,
//! which the tests use to build variants of the fixtures.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The magic number that ends a LevelDB-style table (little-endian in the file).
pub const TABLE_MAGIC: u64 = 0xdb47_7524_8b80_fb57;

/// Size of a table footer: two block handles padded to 40 bytes, then the magic.
pub const FOOTER_SIZE: usize = 48;

/// Size of the trailer after every block: compression byte + masked CRC32C.
const BLOCK_TRAILER_SIZE: usize = 5;

/// Why a bundle could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TfBundleError {
    /// The file could not be opened, read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file ends before something it must contain.
    #[error("{}: truncated: {what}", .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What is cut off.
        what: String,
    },
    /// The index does not end with the table magic number.
    #[error(
        "{}: not a TensorFlow tensor-bundle index: it ends in {found:#018x} instead of the table magic {:#018x} (truncated, or not an .index file)",
        .path.display(),
        TABLE_MAGIC
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The last 8 bytes, read as a little-endian `u64`.
        found: u64,
    },
    /// A block of the index is compressed.
    #[error(
        "{}: the index block at offset {offset} is {kind}-compressed; only uncompressed tables are supported (TensorFlow writes tensor-bundle indexes uncompressed)",
        .path.display()
    )]
    Compressed {
        /// The file.
        path: PathBuf,
        /// Offset of the block.
        offset: u64,
        /// `snappy`, or the unknown compression byte.
        kind: String,
    },
    /// The file is malformed.
    #[error("{}: corrupt: {reason}", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's bytes do not match the CRC32C recorded in the index.
    #[error(
        "{}: tensor `{name}`: checksum mismatch (index says crc32c {expected:#010x}, the data gives {found:#010x})",
        .path.display()
    )]
    Checksum {
        /// The data shard.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The unmasked CRC32C recorded in the index.
        expected: u32,
        /// The CRC32C of the bytes read.
        found: u32,
    },
    /// A tensor's dtype is not one this reader converts.
    #[error("{}: tensor `{name}` has dtype {dtype}; expected {expected}", .path.display())]
    UnsupportedDtype {
        /// The index.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: TfDtype,
        /// What was asked for.
        expected: &'static str,
    },
    /// No entry of that name.
    #[error("{}: no tensor `{name}` in the bundle", .path.display())]
    MissingTensor {
        /// The index.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
    /// A valid bundle using a feature this reader does not handle (big-endian data,
    /// partitioned variables).
    #[error("{}: {reason}", .path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TfBundleError + '_ {
    move |source| TfBundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> TfBundleError {
    TfBundleError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn truncated(path: &Path, what: impl Into<String>) -> TfBundleError {
    TfBundleError::Truncated {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// CRC32C (Castagnoli), as TF and LevelDB use it.

const CRC32C_POLY: u32 = 0x82f6_3b78;

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// Continues the CRC32C `crc` (of the bytes before `data`) over `data` (slicing-by-8).
pub fn crc32c_extend(crc: u32, data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) ^ c;
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = t[0][((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_extend(0, data)
}

const CRC_MASK_DELTA: u32 = 0xa282_ead8;

/// TF/LevelDB's stored form of a CRC: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
pub fn mask_crc(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(CRC_MASK_DELTA)
}

/// Inverse of [`mask_crc`].
pub fn unmask_crc(masked: u32) -> u32 {
    masked.wrapping_sub(CRC_MASK_DELTA).rotate_left(15)
}

// ---------------------------------------------------------------------------------------------
// Wire-format helpers.

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.buf.get(self.pos).ok_or("varint runs past the end")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes")
    }

    fn varint_usize(&mut self) -> Result<usize, &'static str> {
        usize::try_from(self.varint()?).map_err(|_| "varint too large")
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or("field runs past the end")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn fixed32(&mut self) -> Result<u32, &'static str> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(any(test, feature = "bundle-writer"))]
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One protobuf field: number and value.
enum Field<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn proto_fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, &'static str> {
    let mut c = Cursor::new(buf);
    let mut out = Vec::new();
    while !c.done() {
        let tag = c.varint()?;
        let field = tag >> 3;
        let value = match tag & 7 {
            0 => Field::Varint(c.varint()?),
            1 => {
                c.bytes(8)?;
                Field::Fixed64
            }
            2 => {
                let n = c.varint_usize()?;
                Field::Bytes(c.bytes(n)?)
            }
            5 => Field::Fixed32(c.fixed32()?),
            _ => return Err("unsupported protobuf wire type"),
        };
        out.push((field, value));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Protobuf messages of the bundle.

/// A TensorFlow `DataType` enum value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TfDtype(pub i32);

impl TfDtype {
    /// `DT_FLOAT`.
    pub const FLOAT: TfDtype = TfDtype(1);
    /// `DT_DOUBLE`.
    pub const DOUBLE: TfDtype = TfDtype(2);
    /// `DT_INT32`.
    pub const INT32: TfDtype = TfDtype(3);
    /// `DT_STRING`.
    pub const STRING: TfDtype = TfDtype(7);
    /// `DT_INT64`.
    pub const INT64: TfDtype = TfDtype(9);
    /// `DT_BFLOAT16`.
    pub const BFLOAT16: TfDtype = TfDtype(14);
    /// `DT_HALF`.
    pub const HALF: TfDtype = TfDtype(19);

    /// TF's name of the dtype (`DT_FLOAT`, ...), or `DT_<n>` for one not listed here.
    pub fn name(self) -> String {
        let known = match self.0 {
            1 => "DT_FLOAT",
            2 => "DT_DOUBLE",
            3 => "DT_INT32",
            4 => "DT_UINT8",
            5 => "DT_INT16",
            6 => "DT_INT8",
            7 => "DT_STRING",
            8 => "DT_COMPLEX64",
            9 => "DT_INT64",
            10 => "DT_BOOL",
            14 => "DT_BFLOAT16",
            17 => "DT_UINT16",
            18 => "DT_COMPLEX128",
            19 => "DT_HALF",
            22 => "DT_UINT32",
            23 => "DT_UINT64",
            _ => return format!("DT_<{}>", self.0),
        };
        known.to_string()
    }

    /// Bytes per element of a fixed-size dtype (`None` for strings, variants, resources).
    pub fn byte_size(self) -> Option<usize> {
        match self.0 {
            4 | 6 | 10 => Some(1),
            5 | 14 | 17 | 19 => Some(2),
            1 | 3 | 22 => Some(4),
            2 | 8 | 9 | 23 => Some(8),
            18 => Some(16),
            _ => None,
        }
    }
}

impl fmt::Display for TfDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The `BundleHeaderProto` of a bundle (the index's empty-key entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleHeader {
    /// Number of data shards.
    pub num_shards: u32,
    /// Whether the data is big-endian (`endianness = BIG`).
    pub big_endian: bool,
    /// `version.producer`.
    pub version_producer: i64,
}

impl BundleHeader {
    fn decode(buf: &[u8]) -> Result<Self, &'static str> {
        let mut h = BundleHeader {
            num_shards: 0,
            big_endian: false,
            version_producer: 0,
        };
        for (num, f) in proto_fields(buf)? {
            match (num, f) {
                (1, Field::Varint(v)) => {
                    h.num_shards = u32::try_from(v).map_err(|_| "num_shards out of range")?
                }
                (2, Field::Varint(v)) => h.big_endian = v == 1,
                (3, Field::Bytes(b)) => {
                    for (n, f) in proto_fields(b)? {
                        if let (1, Field::Varint(v)) = (n, f) {
                            h.version_producer = v as i64;
                        }
                    }
                }
                (1..=3, _) => return Err("header field of the wrong wire type"),
                _ => {}
            }
        }
        Ok(h)
    }

    #[cfg(any(test, feature = "bundle-writer"))]
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.num_shards != 0 {
            put_varint(&mut out, 1 << 3);
            put_varint(&mut out, u64::from(self.num_shards));
        }
        if self.big_endian {
            put_varint(&mut out, 2 << 3);
            put_varint(&mut out, 1);
        }
        if self.version_producer != 0 {
            let mut v = Vec::new();
            put_varint(&mut v, 1 << 3);
            put_varint(&mut v, self.version_producer as u64);
            put_varint(&mut out, (3 << 3) | 2);
            put_varint(&mut out, v.len() as u64);
            out.extend_from_slice(&v);
        }
        out
    }
}

/// One tensor's `BundleEntryProto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEntry {
    /// Element type.
    pub dtype: TfDtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Which data shard holds the bytes.
    pub shard_id: u32,
    /// Byte offset in the shard.
    pub offset: u64,
    /// Byte length.
    pub size: u64,
    /// Masked CRC32C of the bytes, as stored.
    pub crc32c_masked: u32,
    /// Number of `slices` (non-zero for a partitioned variable, whose data lives in
    /// separate slice entries; not supported by [`TfBundle::read_raw`]).
    pub num_slices: usize,
}

impl BundleEntry {
    /// Number of elements, or `None` when the shape's product overflows (a corrupt entry).
    pub fn num_elements(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    fn decode(buf: &[u8]) -> Result<Self, String> {
        let mut e = BundleEntry {
            dtype: TfDtype(0),
            shape: Vec::new(),
            shard_id: 0,
            offset: 0,
            size: 0,
            crc32c_masked: 0,
            num_slices: 0,
        };
        for (num, f) in proto_fields(buf)? {
            match (num, f) {
                (1, Field::Varint(v)) => {
                    e.dtype = TfDtype(i32::try_from(v).map_err(|_| "dtype out of range")?)
                }
                (2, Field::Bytes(b)) => e.shape = decode_shape(b)?,
                (3, Field::Varint(v)) => {
                    e.shard_id = u32::try_from(v).map_err(|_| "shard_id out of range")?
                }
                (4, Field::Varint(v)) => e.offset = v,
                (5, Field::Varint(v)) => e.size = v,
                (6, Field::Fixed32(v)) => e.crc32c_masked = v,
                (7, Field::Bytes(_)) => e.num_slices += 1,
                (1..=7, _) => return Err(format!("entry field {num} has the wrong wire type")),
                _ => {}
            }
        }
        Ok(e)
    }

    #[cfg(any(test, feature = "bundle-writer"))]
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.dtype.0 != 0 {
            put_varint(&mut out, 1 << 3);
            put_varint(&mut out, self.dtype.0 as u64);
        }
        let mut shape = Vec::new();
        for &d in &self.shape {
            let mut dim = Vec::new();
            if d != 0 {
                put_varint(&mut dim, 1 << 3);
                put_varint(&mut dim, d as u64);
            }
            put_varint(&mut shape, (2 << 3) | 2);
            put_varint(&mut shape, dim.len() as u64);
            shape.extend_from_slice(&dim);
        }
        put_varint(&mut out, (2 << 3) | 2);
        put_varint(&mut out, shape.len() as u64);
        out.extend_from_slice(&shape);
        for (num, v) in [
            (3u64, u64::from(self.shard_id)),
            (4, self.offset),
            (5, self.size),
        ] {
            if v != 0 {
                put_varint(&mut out, num << 3);
                put_varint(&mut out, v);
            }
        }
        put_varint(&mut out, (6 << 3) | 5);
        out.extend_from_slice(&self.crc32c_masked.to_le_bytes());
        out
    }
}

/// Decodes a `TensorShapeProto` (`repeated Dim dim = 2`, `Dim.size = 1`,
/// `unknown_rank = 3`).
fn decode_shape(buf: &[u8]) -> Result<Vec<usize>, String> {
    let mut dims = Vec::new();
    for (num, f) in proto_fields(buf)? {
        match (num, f) {
            (2, Field::Bytes(b)) => {
                let mut size = 0i64;
                for (n, f) in proto_fields(b)? {
                    if let (1, Field::Varint(v)) = (n, f) {
                        size = v as i64;
                    }
                }
                dims.push(
                    usize::try_from(size)
                        .map_err(|_| format!("shape has an unknown or negative size {size}"))?,
                );
            }
            (3, Field::Varint(v)) if v != 0 => return Err("shape of unknown rank".into()),
            _ => {}
        }
    }
    Ok(dims)
}

// ---------------------------------------------------------------------------------------------
// The sorted table (LevelDB format).

/// `(key, value)` entries of a table or block, in order.
type Entries = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Debug, Clone, Copy)]
struct BlockHandle {
    offset: u64,
    size: u64,
}

impl BlockHandle {
    fn decode(c: &mut Cursor<'_>) -> Result<Self, &'static str> {
        Ok(Self {
            offset: c.varint()?,
            size: c.varint()?,
        })
    }

    #[cfg(any(test, feature = "bundle-writer"))]
    fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.offset);
        put_varint(out, self.size);
    }
}

/// The contents of the block at `h` (trailer checked and removed).
fn read_block<'a>(
    path: &Path,
    file: &'a [u8],
    h: BlockHandle,
    what: &str,
) -> Result<&'a [u8], TfBundleError> {
    let start = usize::try_from(h.offset).ok();
    let end = start
        .zip(usize::try_from(h.size).ok())
        .and_then(|(s, n)| s.checked_add(n))
        .and_then(|e| e.checked_add(BLOCK_TRAILER_SIZE));
    let (start, end) = match (start, end) {
        (Some(s), Some(e)) if e <= file.len() => (s, e),
        _ => {
            return Err(truncated(
                path,
                format!(
                    "the {what} at offset {} (+{} bytes and trailer) lies past the end of the {}-byte file",
                    h.offset,
                    h.size,
                    file.len()
                ),
            ))
        }
    };
    let body_end = end - BLOCK_TRAILER_SIZE;
    let kind = file[body_end];
    let stored = u32::from_le_bytes([
        file[body_end + 1],
        file[body_end + 2],
        file[body_end + 3],
        file[body_end + 4],
    ]);
    let actual = crc32c(&file[start..=body_end]);
    if unmask_crc(stored) != actual {
        return Err(corrupt(
            path,
            format!(
                "checksum mismatch in the {what} at offset {}: stored {:#010x}, computed {actual:#010x}",
                h.offset,
                unmask_crc(stored)
            ),
        ));
    }
    match kind {
        0 => Ok(&file[start..body_end]),
        k => Err(TfBundleError::Compressed {
            path: path.to_path_buf(),
            offset: h.offset,
            kind: if k == 1 {
                "snappy".to_string()
            } else {
                format!("unknown (compression byte {k})")
            },
        }),
    }
}

/// All `(key, value)` entries of a block, in order.
fn block_entries(path: &Path, block: &[u8], what: &str) -> Result<Entries, TfBundleError> {
    let bad = |reason: &str| corrupt(path, format!("{what}: {reason}"));
    if block.len() < 4 {
        return Err(bad("block shorter than its restart count"));
    }
    let n = block.len();
    let num_restarts =
        u32::from_le_bytes([block[n - 4], block[n - 3], block[n - 2], block[n - 1]]) as usize;
    let data_end = num_restarts
        .checked_mul(4)
        .and_then(|r| r.checked_add(4))
        .and_then(|r| n.checked_sub(r))
        .ok_or_else(|| bad("restart array larger than the block"))?;
    let mut c = Cursor::new(&block[..data_end]);
    let mut key: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    while !c.done() {
        let (shared, non_shared, value_len) =
            (|| Ok::<_, &'static str>((c.varint_usize()?, c.varint_usize()?, c.varint_usize()?)))()
                .map_err(bad)?;
        if shared > key.len() {
            return Err(bad("entry shares more bytes than the previous key has"));
        }
        key.truncate(shared);
        key.extend_from_slice(c.bytes(non_shared).map_err(bad)?);
        let value = c.bytes(value_len).map_err(bad)?.to_vec();
        out.push((key.clone(), value));
    }
    Ok(out)
}

/// All `(key, value)` entries of a table file, in key order.
fn table_entries(path: &Path, file: &[u8]) -> Result<Entries, TfBundleError> {
    if file.len() < FOOTER_SIZE {
        return Err(truncated(
            path,
            format!(
                "{} bytes, shorter than the {FOOTER_SIZE}-byte table footer",
                file.len()
            ),
        ));
    }
    let footer = &file[file.len() - FOOTER_SIZE..];
    let mut m = [0u8; 8];
    m.copy_from_slice(&footer[40..]);
    let magic = u64::from_le_bytes(m);
    if magic != TABLE_MAGIC {
        return Err(TfBundleError::BadMagic {
            path: path.to_path_buf(),
            found: magic,
        });
    }
    let mut c = Cursor::new(&footer[..40]);
    let _metaindex =
        BlockHandle::decode(&mut c).map_err(|e| corrupt(path, format!("footer: {e}")))?;
    let index = BlockHandle::decode(&mut c).map_err(|e| corrupt(path, format!("footer: {e}")))?;
    let index_block = read_block(path, file, index, "index block")?;
    let mut out = Vec::new();
    for (sep, handle) in block_entries(path, index_block, "index block")? {
        let mut hc = Cursor::new(&handle);
        let h = BlockHandle::decode(&mut hc).map_err(|e| {
            corrupt(
                path,
                format!(
                    "index entry `{}`: bad block handle: {e}",
                    String::from_utf8_lossy(&sep)
                ),
            )
        })?;
        let block = read_block(path, file, h, "data block")?;
        out.extend(block_entries(path, block, "data block")?);
    }
    if out.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(corrupt(path, "table keys are not in increasing order"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The bundle.

/// Where a bundle's files are, from any of: the prefix (`.../model.ckpt-1234`), the `.index`
/// file, a `.data-*` shard, the `.meta` graph, or the directory (its `checkpoint` pointer
/// file, or its only `.index` file).
pub fn resolve_prefix(path: &Path) -> Result<PathBuf, TfBundleError> {
    if path.is_dir() {
        let pointer = path.join("checkpoint");
        if pointer.is_file() {
            let text = std::fs::read_to_string(&pointer).map_err(io_err(&pointer))?;
            let target = text
                .lines()
                .find_map(|l| {
                    let v = l.trim().strip_prefix("model_checkpoint_path:")?.trim();
                    Some(v.trim_matches('"').to_string())
                })
                .ok_or_else(|| corrupt(&pointer, "no `model_checkpoint_path` line"))?;
            let direct = path.join(&target);
            if index_path_of(&direct).is_file() {
                return Ok(direct);
            }
            // The pointer may hold an absolute path of the machine that trained the model.
            let base = Path::new(&target).file_name().map(|b| path.join(b));
            return Ok(base.unwrap_or(direct));
        }
        let mut found = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err(path))? {
            let p = e.map_err(io_err(path))?.path();
            if p.extension().is_some_and(|x| x == "index") {
                found.push(p.with_extension(""));
            }
        }
        return match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(TfBundleError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no `checkpoint` file and no .index file in this directory",
                ),
            }),
            n => Err(TfBundleError::Unsupported {
                path: path.to_path_buf(),
                reason: format!("{n} .index files and no `checkpoint` file: name the one to read"),
            }),
        };
    }
    let s = path.to_string_lossy();
    if let Some(p) = s.strip_suffix(".index").or_else(|| s.strip_suffix(".meta")) {
        return Ok(PathBuf::from(p));
    }
    if let Some(i) = s.rfind(".data-") {
        let tail = &s[i + ".data-".len()..];
        let is_shard = tail.len() == 14
            && tail.as_bytes()[5..9] == *b"-of-"
            && tail[..5]
                .bytes()
                .chain(tail[9..].bytes())
                .all(|b| b.is_ascii_digit());
        if is_shard {
            return Ok(PathBuf::from(&s[..i]));
        }
    }
    Ok(path.to_path_buf())
}

fn index_path_of(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".index");
    PathBuf::from(s)
}

/// Path of data shard `shard` of `num_shards` for a bundle prefix.
pub fn data_path_of(prefix: &Path, shard: u32, num_shards: u32) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(format!(".data-{shard:05}-of-{num_shards:05}"));
    PathBuf::from(s)
}

/// A tensor's dtype, shape and raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: TfDtype,
    /// Shape (TF layout: HWIO conv kernels, `[in, out]` dense kernels).
    pub shape: Vec<usize>,
    /// Row-major little-endian bytes.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// A `DT_FLOAT` tensor.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        Self {
            dtype: TfDtype::FLOAT,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A `DT_INT64` tensor.
    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Self {
        Self {
            dtype: TfDtype::INT64,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// An open tensor bundle: its header and entry table (data is read on demand).
#[derive(Debug, Clone)]
pub struct TfBundle {
    prefix: PathBuf,
    index_path: PathBuf,
    header: BundleHeader,
    entries: BTreeMap<String, BundleEntry>,
}

impl TfBundle {
    /// Opens a bundle and reads its index. `path` is the prefix, the `.index` file, a data
    /// shard, the `.meta` file or the checkpoint directory (see [`resolve_prefix`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TfBundleError> {
        let prefix = resolve_prefix(path.as_ref())?;
        let index_path = index_path_of(&prefix);
        let file = std::fs::read(&index_path).map_err(io_err(&index_path))?;
        let table = table_entries(&index_path, &file)?;
        let mut it = table.into_iter();
        let header = match it.next() {
            Some((k, v)) if k.is_empty() => BundleHeader::decode(&v)
                .map_err(|e| corrupt(&index_path, format!("bundle header: {e}")))?,
            _ => {
                return Err(corrupt(
                    &index_path,
                    "no bundle header (the table's first key is not the empty key)",
                ))
            }
        };
        if header.big_endian {
            return Err(TfBundleError::Unsupported {
                path: index_path,
                reason:
                    "the bundle holds big-endian data; only little-endian bundles are supported"
                        .into(),
            });
        }
        let mut entries = BTreeMap::new();
        for (k, v) in it {
            // Keys of the slices of partitioned variables are binary ("ordered code"
            // beginning with a NUL byte); they are not tensors in their own right.
            if k.first() == Some(&0) {
                continue;
            }
            let name = String::from_utf8(k)
                .map_err(|e| corrupt(&index_path, format!("a key is not UTF-8: {e}")))?;
            let entry = BundleEntry::decode(&v)
                .map_err(|e| corrupt(&index_path, format!("entry `{name}`: {e}")))?;
            if entry.shard_id >= header.num_shards {
                return Err(corrupt(
                    &index_path,
                    format!(
                        "entry `{name}` is in shard {} but the header says {} shard(s)",
                        entry.shard_id, header.num_shards
                    ),
                ));
            }
            entries.insert(name, entry);
        }
        Ok(Self {
            prefix,
            index_path,
            header,
            entries,
        })
    }

    /// The bundle prefix (`.../model.ckpt-1234`).
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The `.index` file.
    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    /// The header.
    pub fn header(&self) -> &BundleHeader {
        &self.header
    }

    /// Every tensor entry by name (the header is not included).
    pub fn entries(&self) -> &BTreeMap<String, BundleEntry> {
        &self.entries
    }

    /// The entry of `name`.
    pub fn entry(&self, name: &str) -> Result<&BundleEntry, TfBundleError> {
        self.entries
            .get(name)
            .ok_or_else(|| TfBundleError::MissingTensor {
                path: self.index_path.clone(),
                name: name.to_string(),
            })
    }

    /// The data shard holding `entry`.
    pub fn data_path(&self, entry: &BundleEntry) -> PathBuf {
        data_path_of(&self.prefix, entry.shard_id, self.header.num_shards)
    }

    /// Checks that every data shard exists and is long enough for all of its entries, so that
    /// a truncated shard is reported even when the tensors cut off are not the ones read. The
    /// error names the first tensor (by offset) that the file cannot hold.
    pub fn check_data_files(&self) -> Result<(), TfBundleError> {
        let mut by_shard: BTreeMap<u32, Vec<(&String, &BundleEntry)>> = BTreeMap::new();
        for (name, e) in &self.entries {
            if e.num_slices == 0 {
                by_shard.entry(e.shard_id).or_default().push((name, e));
            }
        }
        for (shard, mut entries) in by_shard {
            let path = data_path_of(&self.prefix, shard, self.header.num_shards);
            let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            entries.sort_by_key(|(_, e)| e.offset);
            for (name, e) in entries {
                if e.offset.checked_add(e.size).is_none_or(|end| end > len) {
                    return Err(truncated(
                        &path,
                        format!(
                            "tensor `{name}` needs bytes {}..{} but the file has {len}",
                            e.offset,
                            e.offset.saturating_add(e.size)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads the raw bytes of `name`, checking their length and CRC32C.
    pub fn read_raw(&self, name: &str) -> Result<RawTensor, TfBundleError> {
        let entry = self.entry(name)?;
        if entry.num_slices > 0 {
            return Err(TfBundleError::Unsupported {
                path: self.index_path.clone(),
                reason: format!(
                    "tensor `{name}` is a partitioned variable ({} slices); not supported",
                    entry.num_slices
                ),
            });
        }
        let numel = entry.num_elements().ok_or_else(|| {
            corrupt(
                &self.index_path,
                format!("tensor `{name}`: shape {:?} overflows", entry.shape),
            )
        })?;
        if let Some(bs) = entry.dtype.byte_size() {
            if numel.checked_mul(bs).map(|n| n as u64) != Some(entry.size) {
                return Err(corrupt(
                    &self.index_path,
                    format!(
                        "tensor `{name}`: {} of shape {:?} needs {} bytes but the entry says {}",
                        entry.dtype,
                        entry.shape,
                        numel.saturating_mul(bs),
                        entry.size
                    ),
                ));
            }
        }
        let path = self.data_path(entry);
        let mut f = File::open(&path).map_err(io_err(&path))?;
        let len = f.metadata().map_err(io_err(&path))?.len();
        let end = entry.offset.checked_add(entry.size);
        if end.is_none_or(|e| e > len) {
            return Err(truncated(
                &path,
                format!(
                    "tensor `{name}` needs bytes {}..{} but the file has {len}",
                    entry.offset,
                    entry.offset.saturating_add(entry.size)
                ),
            ));
        }
        let size = usize::try_from(entry.size)
            .map_err(|_| corrupt(&self.index_path, format!("tensor `{name}` is too large")))?;
        let mut data = vec![0u8; size];
        f.seek(SeekFrom::Start(entry.offset))
            .map_err(io_err(&path))?;
        f.read_exact(&mut data).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                truncated(&path, format!("tensor `{name}` is cut off"))
            } else {
                TfBundleError::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        let expected = unmask_crc(entry.crc32c_masked);
        let found = crc32c(&data);
        if expected != found {
            return Err(TfBundleError::Checksum {
                path,
                name: name.to_string(),
                expected,
                found,
            });
        }
        Ok(RawTensor {
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            data,
        })
    }

    /// Reads a floating-point tensor as f32 values and its shape (`DT_FLOAT`, or `DT_DOUBLE`
    /// rounded to f32).
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), TfBundleError> {
        let entry = self.entry(name)?;
        if entry.dtype != TfDtype::FLOAT && entry.dtype != TfDtype::DOUBLE {
            return Err(self.dtype_error(name, entry.dtype, "DT_FLOAT or DT_DOUBLE"));
        }
        let raw = self.read_raw(name)?;
        let values = if raw.dtype == TfDtype::FLOAT {
            raw.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        } else {
            raw.data
                .chunks_exact(8)
                .map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    f64::from_le_bytes(a) as f32
                })
                .collect()
        };
        Ok((values, raw.shape))
    }

    /// Reads an integer tensor as i64 values (`DT_INT64` or `DT_INT32`).
    pub fn read_i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>), TfBundleError> {
        let entry = self.entry(name)?;
        if entry.dtype != TfDtype::INT64 && entry.dtype != TfDtype::INT32 {
            return Err(self.dtype_error(name, entry.dtype, "DT_INT64 or DT_INT32"));
        }
        let raw = self.read_raw(name)?;
        let values = if raw.dtype == TfDtype::INT64 {
            raw.data
                .chunks_exact(8)
                .map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    i64::from_le_bytes(a)
                })
                .collect()
        } else {
            raw.data
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect()
        };
        Ok((values, raw.shape))
    }

    fn dtype_error(&self, name: &str, dtype: TfDtype, expected: &'static str) -> TfBundleError {
        TfBundleError::UnsupportedDtype {
            path: self.index_path.clone(),
            name: name.to_string(),
            dtype,
            expected,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing: only the tests build bundles (feature `bundle-writer`).

#[cfg(any(test, feature = "bundle-writer"))]
pub use writer::write_bundle;

#[cfg(any(test, feature = "bundle-writer"))]
mod writer {
    use super::*;

    pub(super) const BLOCK_SIZE: usize = 4096;
    pub(super) const RESTART_INTERVAL: usize = 16;

    pub(super) struct BlockBuilder {
        buf: Vec<u8>,
        restarts: Vec<u32>,
        counter: usize,
        last_key: Vec<u8>,
    }

    impl BlockBuilder {
        pub(super) fn new() -> Self {
            Self {
                buf: Vec::new(),
                restarts: vec![0],
                counter: 0,
                last_key: Vec::new(),
            }
        }

        fn is_empty(&self) -> bool {
            self.buf.is_empty()
        }

        fn size_estimate(&self) -> usize {
            self.buf.len() + 4 * self.restarts.len() + 4
        }

        pub(super) fn add(&mut self, key: &[u8], value: &[u8]) {
            let shared = if self.counter < RESTART_INTERVAL {
                self.last_key
                    .iter()
                    .zip(key)
                    .take_while(|(a, b)| a == b)
                    .count()
            } else {
                self.restarts.push(self.buf.len() as u32);
                self.counter = 0;
                0
            };
            put_varint(&mut self.buf, shared as u64);
            put_varint(&mut self.buf, (key.len() - shared) as u64);
            put_varint(&mut self.buf, value.len() as u64);
            self.buf.extend_from_slice(&key[shared..]);
            self.buf.extend_from_slice(value);
            self.last_key = key.to_vec();
            self.counter += 1;
        }

        pub(super) fn finish(mut self) -> Vec<u8> {
            for r in &self.restarts {
                self.buf.extend_from_slice(&r.to_le_bytes());
            }
            self.buf
                .extend_from_slice(&(self.restarts.len() as u32).to_le_bytes());
            self.buf
        }
    }

    pub(super) fn write_block(out: &mut Vec<u8>, contents: &[u8]) -> BlockHandle {
        write_block_typed(out, contents, 0)
    }

    /// Appends a block and its trailer (compression byte `kind`, masked CRC32C).
    pub(super) fn write_block_typed(out: &mut Vec<u8>, contents: &[u8], kind: u8) -> BlockHandle {
        let h = BlockHandle {
            offset: out.len() as u64,
            size: contents.len() as u64,
        };
        out.extend_from_slice(contents);
        let crc = crc32c_extend(crc32c(contents), &[kind]);
        out.push(kind);
        out.extend_from_slice(&mask_crc(crc).to_le_bytes());
        h
    }

    /// Encodes sorted `(key, value)` pairs as an uncompressed table file.
    pub(super) fn build_table(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut index = BlockBuilder::new();
        let mut block = BlockBuilder::new();
        let flush = |block: BlockBuilder, out: &mut Vec<u8>, index: &mut BlockBuilder| {
            let last = block.last_key.clone();
            let h = write_block(out, &block.finish());
            let mut v = Vec::new();
            h.encode(&mut v);
            index.add(&last, &v);
        };
        for (k, v) in entries {
            block.add(k, v);
            if block.size_estimate() >= BLOCK_SIZE {
                flush(
                    std::mem::replace(&mut block, BlockBuilder::new()),
                    &mut out,
                    &mut index,
                );
            }
        }
        if !block.is_empty() {
            flush(block, &mut out, &mut index);
        }
        let metaindex = write_block(&mut out, &BlockBuilder::new().finish());
        let index = write_block(&mut out, &index.finish());
        let mut footer = Vec::with_capacity(FOOTER_SIZE);
        metaindex.encode(&mut footer);
        index.encode(&mut footer);
        footer.resize(40, 0);
        footer.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
        out.extend_from_slice(&footer);
        out
    }

    /// Writes a single-shard, little-endian bundle: `{prefix}.index` and
    /// `{prefix}.data-00000-of-00001`, the tensors in name order, as TF's `SaveV2` lays them out.
    /// Tensor names must not be empty (the empty key is the header).
    pub fn write_bundle(
        prefix: impl AsRef<Path>,
        tensors: &BTreeMap<String, RawTensor>,
    ) -> Result<(), TfBundleError> {
        let prefix = prefix.as_ref();
        let index_path = index_path_of(prefix);
        let data_path = data_path_of(prefix, 0, 1);
        let header = BundleHeader {
            num_shards: 1,
            big_endian: false,
            version_producer: 1,
        };
        let mut data = Vec::new();
        let mut table = vec![(Vec::new(), header.encode())];
        for (name, t) in tensors {
            if name.is_empty() {
                return Err(corrupt(&index_path, "a tensor name is empty"));
            }
            let entry = BundleEntry {
                dtype: t.dtype,
                shape: t.shape.clone(),
                shard_id: 0,
                offset: data.len() as u64,
                size: t.data.len() as u64,
                crc32c_masked: mask_crc(crc32c(&t.data)),
                num_slices: 0,
            };
            data.extend_from_slice(&t.data);
            table.push((name.as_bytes().to_vec(), entry.encode()));
        }
        let write = |path: &Path, bytes: &[u8]| -> Result<(), TfBundleError> {
            simclr_fs::write_atomic(path, bytes).map_err(io_err(path))
        };
        write(&data_path, &data)?;
        write(&index_path, &build_table(&table))
    }
}

#[cfg(test)]
mod tests {
    use super::writer::*;
    use super::*;

    #[test]
    fn crc32c_known_values() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0..32u8).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for split in [0, 1, 7, 8, 9, 500, 1000] {
            assert_eq!(
                crc32c_extend(crc32c(&data[..split]), &data[split..]),
                crc32c(&data)
            );
        }
        // Slicing-by-8 agrees with the bytewise definition.
        let bytewise = data.iter().fold(!0u32, |c, &b| {
            CRC_TABLES[0][((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
        });
        assert_eq!(!bytewise, crc32c(&data));
    }

    #[test]
    #[allow(clippy::manual_rotate)] // the formula as TF documents it
    fn mask_round_trips() {
        for c in [0u32, 1, 0xdead_beef, u32::MAX, 0xe306_9283] {
            assert_eq!(unmask_crc(mask_crc(c)), c);
            assert_eq!(
                mask_crc(c),
                ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
            );
        }
    }

    #[test]
    fn table_round_trips_across_blocks_and_restarts() {
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = (0..500)
            .map(|i| {
                (
                    format!("base_model/conv2d_{i:04}/kernel").into_bytes(),
                    vec![i as u8; i % 37],
                )
            })
            .collect();
        entries.insert(0, (Vec::new(), b"header".to_vec()));
        let file = build_table(&entries);
        let back = table_entries(Path::new("t.index"), &file).unwrap();
        assert_eq!(back, entries);
    }

    fn table_with_index_kind(kind: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let mut block = BlockBuilder::new();
        block.add(b"", b"h");
        let data = write_block(&mut out, &block.finish());
        let meta = write_block(&mut out, &BlockBuilder::new().finish());
        let mut index = BlockBuilder::new();
        let mut v = Vec::new();
        data.encode(&mut v);
        index.add(b"", &v);
        let index = write_block_typed(&mut out, &index.finish(), kind);
        let mut footer = Vec::new();
        meta.encode(&mut footer);
        index.encode(&mut footer);
        footer.resize(40, 0);
        footer.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
        out.extend_from_slice(&footer);
        out
    }

    #[test]
    fn compressed_blocks_are_refused_clearly() {
        let p = Path::new("m.index");
        assert_eq!(
            table_entries(p, &table_with_index_kind(0)).unwrap().len(),
            1
        );
        let err = table_entries(p, &table_with_index_kind(1)).unwrap_err();
        assert!(
            matches!(&err, TfBundleError::Compressed { kind, .. } if kind == "snappy"),
            "{err}"
        );
        assert!(err.to_string().contains("snappy-compressed"), "{err}");
        let err = table_entries(p, &table_with_index_kind(7)).unwrap_err();
        assert!(matches!(err, TfBundleError::Compressed { .. }), "{err}");
    }

    #[test]
    fn block_checksums_are_verified() {
        let mut t = table_with_index_kind(0);
        t[0] ^= 0x40; // inside the first data block
        let err = table_entries(Path::new("m.index"), &t).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn entry_proto_round_trips() {
        let e = BundleEntry {
            dtype: TfDtype::FLOAT,
            shape: vec![3, 3, 0, 64],
            shard_id: 2,
            offset: 1 << 40,
            size: 0,
            crc32c_masked: 0x1234_5678,
            num_slices: 0,
        };
        assert_eq!(BundleEntry::decode(&e.encode()).unwrap(), e);
        let scalar = BundleEntry {
            shape: vec![],
            dtype: TfDtype::INT64,
            ..e
        };
        assert_eq!(BundleEntry::decode(&scalar.encode()).unwrap(), scalar);
    }

    #[test]
    fn prefixes_resolve() {
        let p = |s: &str| resolve_prefix(Path::new(s)).unwrap();
        assert_eq!(p("/x/model.ckpt-5.index"), PathBuf::from("/x/model.ckpt-5"));
        assert_eq!(p("/x/model.ckpt-5.meta"), PathBuf::from("/x/model.ckpt-5"));
        assert_eq!(
            p("/x/model.ckpt-5.data-00000-of-00001"),
            PathBuf::from("/x/model.ckpt-5")
        );
        assert_eq!(p("/x/model.ckpt-5"), PathBuf::from("/x/model.ckpt-5"));
        assert_eq!(
            data_path_of(Path::new("/x/m"), 3, 12),
            PathBuf::from("/x/m.data-00003-of-00012")
        );
    }
}
