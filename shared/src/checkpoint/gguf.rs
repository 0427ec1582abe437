//! GGUF files: header, metadata, tensor table, and tensor data dequantised to `f32`.
//!
//! Written by hand rather than taken from a crate: the GGUF crates on crates.io either come with a
//! whole inference engine (candle) or panic on malformed input, and fedtune treats model files
//! from a device or a download as untrusted. Every count and offset is checked against a hard
//! limit and against the file's length before anything is allocated or sliced.
//!
//! Layout (GGUF v2/v3, little-endian): magic `GGUF`, version `u32`, tensor count `u64`, metadata
//! count `u64`; metadata entries (key string, value type `u32`, value); tensor infos (name, rank
//! `u32`, dims `u64` innermost first, ggml type `u32`, offset `u64`); padding to
//! `general.alignment` (32 by default); tensor data.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::CheckpointError;
use super::ggml_type::GgmlType;
use super::reader::{ReadError, Reader};

/// The file's first four bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Default data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest string accepted (keys, names, chat templates): 16 MiB.
const MAX_STRING: u64 = 16 << 20;
/// Most elements in one metadata array (a vocabulary is ~10^5; 2^24 leaves room for any real one).
const MAX_ARRAY: u64 = 1 << 24;
/// Most metadata entries and tensors.
const MAX_ENTRIES: u64 = 1 << 20;
/// ggml's `GGML_MAX_DIMS`.
const MAX_RANK: u32 = 4;
/// Deepest nesting of arrays in metadata.
const MAX_NESTING: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values.
    Array(Vec<MetadataValue>),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

impl MetadataValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (integers convert).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // The shortest decimal that round-trips the f32 (1e-5, not 9.99999974e-6), which is
            // the value the model's authors wrote before it was stored as f32.
            Self::F32(v) => v.to_string().parse().ok(),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }
}

/// The key-value metadata of a GGUF file, with typed accessors that name the key in their errors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufMetadata {
    entries: BTreeMap<String, MetadataValue>,
}

impl GgufMetadata {
    /// The raw value under `key`.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.entries.get(key)
    }

    /// Every entry, sorted by key.
    pub fn entries(&self) -> &BTreeMap<String, MetadataValue> {
        &self.entries
    }

    /// Inserts or replaces an entry (used when writing files).
    pub fn insert(&mut self, key: impl Into<String>, value: MetadataValue) {
        self.entries.insert(key.into(), value);
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        f: impl FnOnce(&'a MetadataValue) -> Option<T>,
    ) -> Result<T, MetadataError> {
        let value = self
            .entries
            .get(key)
            .ok_or_else(|| MetadataError::Missing {
                key: key.to_string(),
            })?;
        f(value).ok_or_else(|| MetadataError::WrongType {
            key: key.to_string(),
            expected,
        })
    }

    /// A required unsigned integer.
    pub fn usize(&self, key: &str) -> Result<usize, MetadataError> {
        self.typed(key, "unsigned integer", |v| {
            v.as_u64().and_then(|v| usize::try_from(v).ok())
        })
    }

    /// A required float.
    pub fn f64(&self, key: &str) -> Result<f64, MetadataError> {
        self.typed(key, "number", MetadataValue::as_f64)
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str, MetadataError> {
        self.typed(key, "string", MetadataValue::as_str)
    }

    /// A required array of strings.
    pub fn str_array(&self, key: &str) -> Result<Vec<&str>, MetadataError> {
        self.typed(key, "array of strings", |v| {
            v.as_array()?.iter().map(MetadataValue::as_str).collect()
        })
    }

    /// A required array of integers.
    pub fn i64_array(&self, key: &str) -> Result<Vec<i64>, MetadataError> {
        self.typed(key, "array of integers", |v| {
            v.as_array()?.iter().map(MetadataValue::as_i64).collect()
        })
    }

    /// An optional value of any of the accessor types: `Ok(None)` when absent.
    pub fn optional<'a, T>(
        &'a self,
        key: &str,
        get: impl FnOnce(&'a Self, &str) -> Result<T, MetadataError>,
    ) -> Result<Option<T>, MetadataError> {
        if self.entries.contains_key(key) {
            get(self, key).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// A metadata key that is missing or of the wrong type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// The key is absent.
    #[error("metadata key `{key}` is missing")]
    Missing {
        /// The key.
        key: String,
    },
    /// The key holds another type.
    #[error("metadata key `{key}` is not a {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What was expected.
        expected: &'static str,
    },
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor's name in the file (llama.cpp naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as stored: innermost (fastest-varying) first, as in ggml's `ne`.
    pub ggml_dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The shape in row-major order, outermost first (the order burn and PyTorch use).
    pub fn shape(&self) -> Vec<usize> {
        self.ggml_dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.ggml_dims.iter().map(|&d| d as usize).product()
    }
}

/// An open GGUF file: parsed header and tensor table over the memory-mapped bytes.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    bytes: memmap2::Mmap,
    version: u32,
    metadata: GgufMetadata,
    tensors: Vec<GgufTensorInfo>,
    by_name: BTreeMap<String, usize>,
    data_start: usize,
}

impl GgufFile {
    /// Opens and validates a GGUF file: every tensor's data range must lie inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only and private to this process. A concurrent writer that
        // truncates the file could still fault the process; model files are not written while
        // loaded, and reading them through a map keeps a multi-gigabyte model out of the heap.
        #[allow(unsafe_code)]
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })?;
        let malformed = |reason: String| CheckpointError::Malformed {
            path: path.clone(),
            reason,
        };
        let read = |e: ReadError| CheckpointError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        };

        let mut r = Reader::new(&bytes);
        let magic = r
            .take(4)
            .map_err(|_| malformed("file is shorter than the GGUF magic".into()))?;
        if magic != MAGIC {
            return Err(CheckpointError::BadMagic {
                path,
                found: magic.to_vec(),
            });
        }
        let version = r.u32().map_err(read)?;
        if !(2..=3).contains(&version) {
            return Err(malformed(format!(
                "unsupported GGUF version {version} (2 and 3 are)"
            )));
        }
        // Each tensor info takes at least 8 (name len) + 4 + 4 + 8 bytes; each entry 8 + 4.
        let tensor_count = r.count("tensor count", MAX_ENTRIES, 0).map_err(read)?;
        let kv_count = r.count("metadata count", MAX_ENTRIES, 12).map_err(read)?;

        let mut metadata = GgufMetadata::default();
        for _ in 0..kv_count {
            let key = r.string(MAX_STRING).map_err(read)?;
            let ty = r.u32().map_err(read)?;
            let value = read_value(&mut r, ty, 0).map_err(|e| match e {
                ValueError::Read(e) => malformed(format!("metadata `{key}`: {e}")),
                ValueError::Type(t) => {
                    malformed(format!("metadata `{key}`: unknown value type {t}"))
                }
                ValueError::Nesting => {
                    malformed(format!("metadata `{key}`: arrays nested too deep"))
                }
            })?;
            metadata.entries.insert(key, value);
        }
        if tensor_count as u128 * 24 > r.remaining() as u128 {
            return Err(malformed(format!(
                "tensor count {tensor_count} cannot fit in the {} bytes left",
                r.remaining()
            )));
        }

        let mut tensors = Vec::with_capacity(tensor_count);
        let mut by_name = BTreeMap::new();
        for _ in 0..tensor_count {
            let name = r.string(MAX_STRING).map_err(read)?;
            let bad = |reason: String| CheckpointError::BadTensor {
                path: path.clone(),
                tensor: name.clone(),
                reason,
            };
            let rank = r.u32().map_err(read)?;
            if rank == 0 || rank > MAX_RANK {
                return Err(bad(format!("rank {rank} outside 1..={MAX_RANK}")));
            }
            let mut ggml_dims = Vec::with_capacity(rank as usize);
            for _ in 0..rank {
                ggml_dims.push(r.u64().map_err(read)?);
            }
            let type_id = r.u32().map_err(read)?;
            let ty = GgmlType::from_id(type_id)
                .ok_or_else(|| bad(format!("unsupported ggml tensor type {type_id}")))?;
            let offset = r.u64().map_err(read)?;
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad("tensor name appears twice".into()));
            }
            tensors.push(GgufTensorInfo {
                name,
                ggml_dims,
                ty,
                offset,
            });
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| malformed("general.alignment is not a power of two".into()))?,
        };
        let data_start = (r.position() as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        for t in &tensors {
            let bad = |reason: String| CheckpointError::BadTensor {
                path: path.clone(),
                tensor: t.name.clone(),
                reason,
            };
            let elements = t
                .ggml_dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= usize::MAX as u64 / 4)
                .ok_or_else(|| bad(format!("dims {:?} overflow", t.ggml_dims)))?;
            let size = t.ty.bytes_for(elements as usize).ok_or_else(|| {
                bad(format!(
                    "{} elements is not a whole number of {:?} blocks",
                    elements, t.ty
                ))
            })? as u64;
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(size))
                .ok_or_else(|| bad("data offset overflows".into()))?;
            if end > file_len {
                return Err(bad(format!(
                    "data ends at byte {end}, past the end of the file ({file_len} bytes): truncated?"
                )));
            }
        }

        Ok(Self {
            path,
            bytes,
            version,
            metadata,
            tensors,
            by_name,
            data_start: data_start as usize,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The key-value metadata.
    pub fn metadata(&self) -> &GgufMetadata {
        &self.metadata
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The table entry of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of tensor `name`.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], CheckpointError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })?;
        // Bounds were checked in `open`.
        let start = self.data_start + info.offset as usize;
        let len = info.ty.bytes_for(info.elements()).unwrap_or(0);
        Ok(&self.bytes[start..start + len])
    }

    /// Tensor `name` dequantised to `f32`, with its row-major shape (outermost first).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        let bytes = self.tensor_bytes(name)?;
        let info = &self.tensors[self.by_name[name]];
        let mut out = vec![0.0f32; info.elements()];
        info.ty
            .dequantize(bytes, &mut out)
            .map_err(|e| CheckpointError::BadTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                reason: e.to_string(),
            })?;
        Ok((info.shape(), out))
    }
}

enum ValueError {
    Read(ReadError),
    Type(u32),
    Nesting,
}

impl From<ReadError> for ValueError {
    fn from(e: ReadError) -> Self {
        Self::Read(e)
    }
}

fn read_value(r: &mut Reader<'_>, ty: u32, depth: usize) -> Result<MetadataValue, ValueError> {
    Ok(match ty {
        0 => MetadataValue::U8(r.u8()?),
        1 => MetadataValue::I8(r.u8()? as i8),
        2 => MetadataValue::U16(r.u16()?),
        3 => MetadataValue::I16(r.u16()? as i16),
        4 => MetadataValue::U32(r.u32()?),
        5 => MetadataValue::I32(r.u32()? as i32),
        6 => MetadataValue::F32(r.f32()?),
        7 => MetadataValue::Bool(r.u8()? != 0),
        8 => MetadataValue::String(r.string(MAX_STRING)?),
        9 => {
            if depth >= MAX_NESTING {
                return Err(ValueError::Nesting);
            }
            let elem_ty = r.u32()?;
            let min_size = match elem_ty {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                8..=12 => 8,
                other => return Err(ValueError::Type(other)),
            };
            let n = r.count("array length", MAX_ARRAY, min_size)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(read_value(r, elem_ty, depth + 1)?);
            }
            MetadataValue::Array(items)
        }
        10 => MetadataValue::U64(r.u64()?),
        11 => MetadataValue::I64(r.u64()? as i64),
        12 => MetadataValue::F64(r.f64()?),
        other => return Err(ValueError::Type(other)),
    })
}

/// Writes GGUF v3 files: metadata plus tensors quantised to a chosen type.
///
/// Used to export models for llama.cpp-compatible runtimes and by tests to build small files.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: GgufMetadata,
    /// Name, ggml dims (innermost first), ggml type id, data.
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a metadata entry.
    pub fn metadata(&mut self, key: impl Into<String>, value: MetadataValue) -> &mut Self {
        self.metadata.insert(key, value);
        self
    }

    /// Adds a tensor with row-major `shape` (outermost first), quantised to `ty`.
    ///
    /// # Panics
    /// When `values` does not match `shape` or `ty` has no quantiser for these values.
    pub fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        ty: GgmlType,
        values: &[f32],
    ) -> &mut Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "shape and values disagree"
        );
        let bytes = ty
            .quantize(values)
            .unwrap_or_else(|| panic!("cannot quantise {} values to {ty:?}", values.len()));
        self.raw_tensor(name, shape, ty.id(), bytes)
    }

    /// Adds a tensor from raw bytes and a raw type id (tests use it to write hostile files).
    pub fn raw_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        type_id: u32,
        bytes: Vec<u8>,
    ) -> &mut Self {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.to_string(), dims, type_id, bytes));
        self
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.entries.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata.entries {
            write_string(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for (name, dims, type_id, bytes) in &self.tensors {
            write_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&type_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + bytes.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        let pad_to = |out: &mut Vec<u8>, n: usize| out.resize(n, 0);
        let data_start = (out.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        pad_to(&mut out, data_start as usize);
        for ((_, _, _, bytes), offset) in self.tensors.iter().zip(offsets) {
            pad_to(&mut out, (data_start + offset) as usize);
            out.extend_from_slice(bytes);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        let mut file = File::create(path)?;
        file.write_all(&self.to_bytes())?;
        file.sync_all()
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &MetadataValue) {
    match value {
        MetadataValue::U8(v) => out.push(*v),
        MetadataValue::I8(v) => out.push(*v as u8),
        MetadataValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Bool(v) => out.push(*v as u8),
        MetadataValue::String(s) => write_string(out, s),
        MetadataValue::Array(items) => {
            let elem_ty = items.first().map_or(4, MetadataValue::type_id);
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|v| write_value(out, v));
        }
        MetadataValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}
