//! GGUF, llama.cpp's model file: header, metadata, tensor infos, and de-quantisation of the
//! block formats most published files use.
//!
//! Every count, length, size and offset read from the file is checked against the bytes that
//! remain *before* anything is allocated or read, so a hostile or truncated file is an error that
//! names the problem, never a huge allocation or an out-of-bounds read. Tensor data is read one
//! tensor at a time (seek + read), so the file is never held in memory whole.

use half::{bf16, f16};
use kv_core::{KvError, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
/// Nesting allowed for arrays of arrays (the format permits it; real files use none).
const MAX_ARRAY_DEPTH: usize = 2;
/// ggml's maximum tensor rank.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Unsigned 8-bit integer.
    U8(u8),
    /// Signed 8-bit integer.
    I8(i8),
    /// Unsigned 16-bit integer.
    U16(u16),
    /// Signed 16-bit integer.
    I16(i16),
    /// Unsigned 32-bit integer.
    U32(u32),
    /// Signed 32-bit integer.
    I32(i32),
    /// 32-bit float.
    F32(f32),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values of one type.
    Array(Vec<GgufValue>),
    /// Unsigned 64-bit integer.
    U64(u64),
    /// Signed 64-bit integer.
    I64(i64),
    /// 64-bit float.
    F64(f64),
}

impl GgufValue {
    /// The value's GGUF type, for messages that must not print a hostile array whole.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::Str(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The string, if the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, if the value is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A ggml tensor type: the element encoding of a tensor's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

/// Names of ggml's tensor types by id (gaps are ids ggml retired).
const TYPE_NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

impl GgmlType {
    /// F32.
    pub const F32: Self = Self(0);
    /// F16.
    pub const F16: Self = Self(1);
    /// Q4_0: 32 values, one f16 scale, 4-bit offsets from 8.
    pub const Q4_0: Self = Self(2);
    /// Q4_1: 32 values, f16 scale and minimum, 4-bit.
    pub const Q4_1: Self = Self(3);
    /// Q5_0: 32 values, f16 scale, 5-bit offsets from 16.
    pub const Q5_0: Self = Self(6);
    /// Q5_1: 32 values, f16 scale and minimum, 5-bit.
    pub const Q5_1: Self = Self(7);
    /// Q8_0: 32 values, f16 scale, 8-bit.
    pub const Q8_0: Self = Self(8);
    /// Q4_K: 256-value super-blocks of eight 32-value blocks with 6-bit scales and minima.
    pub const Q4_K: Self = Self(12);
    /// Q5_K: as Q4_K with a fifth bit per value.
    pub const Q5_K: Self = Self(13);
    /// Q6_K: 256-value super-blocks of sixteen 16-value blocks with 8-bit scales, 6-bit values.
    pub const Q6_K: Self = Self(14);
    /// BF16.
    pub const BF16: Self = Self(30);

    /// The types this reader de-quantises.
    pub const SUPPORTED: [GgmlType; 11] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    /// ggml's name for the type (`TYPE_<id>` for an id it never defined).
    pub fn name(self) -> String {
        TYPE_NAMES
            .iter()
            .find(|(id, _)| *id == self.0)
            .map_or_else(|| format!("TYPE_{}", self.0), |(_, n)| n.to_string())
    }

    /// `(values per block, bytes per block)` for the supported types.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
            _ => return None,
        })
    }

    fn supported_names() -> String {
        Self::SUPPORTED
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Where a tensor lies in the file and how it is encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml's dims, fastest-varying first: a `[rows, cols]` matrix is `[cols, rows]`.
    pub dims: Vec<u64>,
    /// Element encoding.
    pub kind: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The shape in row-major order (slowest-varying first), as a PyTorch tensor would have it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Elements in the tensor (checked when the file was read).
    pub fn elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// A parsed GGUF file: metadata and tensor infos; tensor data stays on disk until read.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key, in key order.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    data_start: u64,
    file_len: u64,
}

/// A bounded reader: every read is checked against the file's length first.
struct Bounded<R> {
    inner: R,
    at: u64,
    len: u64,
}

impl<R: Read> Bounded<R> {
    fn remaining(&self) -> u64 {
        self.len - self.at
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        if (N as u64) > self.remaining() {
            return Err(format!(
                "truncated at byte {} while reading {what}",
                self.at
            ));
        }
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("read error at byte {}: {e}", self.at))?;
        self.at += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(format!(
                "{what} claims {len} bytes at byte {}, but only {} remain",
                self.at,
                self.remaining()
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("read error at byte {}: {e}", self.at))?;
        self.at += len;
        String::from_utf8(buf).map_err(|_| format!("{what} at byte {} is not UTF-8", self.at - len))
    }

    /// Smallest encoding of a value of type `t` (to bound array counts before allocating).
    fn min_size(t: u32) -> u64 {
        match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => 1,
        }
    }

    fn value(
        &mut self,
        t: u32,
        depth: usize,
        what: &str,
    ) -> std::result::Result<GgufValue, String> {
        Ok(match t {
            0 => GgufValue::U8(self.bytes::<1>(what)?[0]),
            1 => GgufValue::I8(self.bytes::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.bytes(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.bytes(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.bytes(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.bytes(what)?)),
            7 => match self.bytes::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("{what}: boolean byte {b} (valid: 0 or 1)")),
            },
            8 => GgufValue::Str(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    ));
                }
                let inner = self.u32(what)?;
                let count = self.u64(what)?;
                let need = count.checked_mul(Self::min_size(inner));
                if need.is_none_or(|n| n > self.remaining()) {
                    return Err(format!(
                        "{what}: array of {count} values cannot fit in the {} bytes that remain",
                        self.remaining()
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(inner, depth + 1, what)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.bytes(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.bytes(what)?)),
            other => {
                return Err(format!(
                    "{what}: unknown metadata value type {other} (valid: 0 to 12)"
                ));
            }
        })
    }
}

impl GgufFile {
    /// Reads the header, metadata and tensor infos of `path`, validating every size against the
    /// file's length.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| KvError::io(path, e))?;
        let len = file.metadata().map_err(|e| KvError::io(path, e))?.len();
        let mut r = Bounded {
            inner: BufReader::new(file),
            at: 0,
            len,
        };
        Self::parse(&mut r, path)
            .map_err(|m| KvError::io(path, format!("not a usable GGUF file: {m}")))
    }

    fn parse<R: Read>(r: &mut Bounded<R>, path: &Path) -> std::result::Result<Self, String> {
        let magic = r
            .bytes::<4>("the magic number")
            .map_err(|_| "shorter than a GGUF header".to_string())?;
        if &magic != MAGIC {
            return Err(format!(
                "wrong magic {:?} (a GGUF file starts with \"GGUF\")",
                String::from_utf8_lossy(&magic)
            ));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "version {version} (this reader reads versions 2 and 3)"
            ));
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        // A metadata entry takes at least 13 bytes (key length, key, type, value); a tensor info 28.
        if n_kv.checked_mul(13).is_none_or(|n| n > r.remaining()) {
            return Err(format!(
                "{n_kv} metadata entries cannot fit in a file of {} bytes (truncated or corrupt)",
                r.len
            ));
        }
        if n_tensors.checked_mul(28).is_none_or(|n| n > r.remaining()) {
            return Err(format!(
                "{n_tensors} tensor infos cannot fit in a file of {} bytes (truncated or corrupt)",
                r.len
            ));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key {i}"))?;
            let t = r.u32(&format!("the type of metadata {key}"))?;
            let value = r.value(t, 0, &format!("metadata {key}"))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(format!("metadata key {key} appears twice"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(format!(
                        "general.alignment = {v:?} (valid: a power of two up to 1 MiB)"
                    ));
                }
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format!("the name of tensor {i}"))?;
            let n_dims = r.u32(&format!("the rank of tensor {name}"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!(
                    "tensor {name} has rank {n_dims} (valid: 1 to {MAX_DIMS})"
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("the dims of tensor {name}"))?);
            }
            let kind = GgmlType(r.u32(&format!("the type of tensor {name}"))?);
            let offset = r.u64(&format!("the offset of tensor {name}"))?;
            if offset % alignment != 0 {
                return Err(format!(
                    "tensor {name} starts at offset {offset}, not a multiple of the alignment {alignment}"
                ));
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                kind,
                offset,
            });
        }
        let data_start = r.at.div_ceil(alignment) * alignment;
        let file = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            file_len: r.len,
        };
        let mut seen = std::collections::HashSet::new();
        for t in &file.tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(format!("tensor {} appears twice", t.name));
            }
            // Sizes of supported types are checked now; others when (and if) they are read.
            if t.kind.block().is_some() {
                file.extent(t)?;
            }
        }
        Ok(file)
    }

    /// The byte range of a tensor's data in the file, checked: no overflow, within the file,
    /// a whole number of blocks per row.
    fn extent(&self, t: &GgufTensorInfo) -> std::result::Result<(u64, u64), String> {
        let Some((per_block, block_bytes)) = t.kind.block() else {
            return Err(format!(
                "tensor {} has type {}, which this reader does not de-quantise (supported: {})",
                t.name,
                t.kind.name(),
                GgmlType::supported_names()
            ));
        };
        let elements = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let elements = match elements {
            Some(n) if n > 0 && n <= isize::MAX as u64 / 4 => n,
            _ => {
                return Err(format!(
                    "tensor {} has dims {:?}, whose element count is zero or overflows",
                    t.name, t.dims
                ));
            }
        };
        if !t.dims[0].is_multiple_of(per_block as u64) {
            return Err(format!(
                "tensor {} rows of {} values are not whole {}-value blocks of {}",
                t.name,
                t.dims[0],
                per_block,
                t.kind.name()
            ));
        }
        let bytes = elements / per_block as u64 * block_bytes as u64;
        let start = self.data_start.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(bytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.file_len => Ok((s, bytes)),
            _ => Err(format!(
                "tensor {} needs bytes {}..{} of the data section, past the end of the file ({} bytes; the file is truncated or corrupt)",
                t.name,
                t.offset,
                t.offset.saturating_add(bytes),
                self.file_len.saturating_sub(self.data_start)
            )),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A required metadata value; an error naming the key when absent.
    pub fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key)
            .ok_or_else(|| KvError::io(&self.path, format!("GGUF metadata has no {key}")))
    }

    /// A required unsigned integer.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| {
            KvError::io(
                &self.path,
                format!("GGUF metadata {key} = {v:?}, expected an unsigned integer"),
            )
        })
    }

    /// A required number.
    pub fn require_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| {
            KvError::io(
                &self.path,
                format!("GGUF metadata {key} = {v:?}, expected a number"),
            )
        })
    }

    /// The info of a tensor by name.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads and de-quantises a tensor to f32, in row-major order of [`GgufTensorInfo::shape`].
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (info, raw) = self.read_raw(name)?;
        let values =
            dequantize(info.kind, &raw, info.elements()).map_err(|m| KvError::io(&self.path, m))?;
        Ok((info.shape(), values))
    }

    /// Reads a quantised tensor as its integer codes and block scales, in row-major order of
    /// [`GgufTensorInfo::shape`]; None for a float tensor (F32, F16, BF16).
    pub fn read_codes(&self, name: &str) -> Result<Option<(Vec<usize>, BlockCodes)>> {
        let (info, raw) = self.read_raw(name)?;
        let codes = block_codes(info.kind, &raw, info.elements())
            .map_err(|m| KvError::io(&self.path, m))?;
        Ok(codes.map(|c| (info.shape(), c)))
    }

    fn read_raw(&self, name: &str) -> Result<(&GgufTensorInfo, Vec<u8>)> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| KvError::io(&self.path, format!("GGUF file has no tensor {name}")))?;
        let (start, bytes) = self.extent(info).map_err(|m| KvError::io(&self.path, m))?;
        let mut file = File::open(&self.path).map_err(|e| KvError::io(&self.path, e))?;
        // The file may have shrunk since it was opened; read_exact then fails rather than
        // returning a short tensor.
        file.seek(SeekFrom::Start(start))
            .map_err(|e| KvError::io(&self.path, e))?;
        let mut raw = vec![0u8; bytes as usize];
        file.read_exact(&mut raw)
            .map_err(|e| KvError::io(&self.path, format!("tensor {name}: {e}")))?;
        Ok((info, raw))
    }
}

/// A quantised tensor as integer codes with a scale and an optional offset per block: value `i`
/// is `codes[i] as f32 * scales[i / block]`, plus `offsets[i / block]` when there are offsets,
/// which is the whole of ggml's de-quantisation arithmetic for every type read here.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockCodes {
    /// Values per scale: 32, or 16 for Q6_K.
    pub block: usize,
    /// One code per value.
    pub codes: Vec<i8>,
    /// One scale per block.
    pub scales: Vec<f32>,
    /// One offset per block, for the types with a minimum (Q4_1, Q5_1, Q4_K, Q5_K).
    pub offsets: Option<Vec<f32>>,
}

impl BlockCodes {
    /// The de-quantised values.
    pub fn values(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.codes.len());
        for (b, codes) in self.codes.chunks_exact(self.block).enumerate() {
            let scale = self.scales[b];
            match &self.offsets {
                Some(offsets) => out.extend(codes.iter().map(|&c| c as f32 * scale + offsets[b])),
                None => out.extend(codes.iter().map(|&c| c as f32 * scale)),
            }
        }
        out
    }

    /// The codes of rows `rows` of a `[_, cols]` tensor reordered by `order` (new row `i` is old
    /// row `order[i]`), scales and offsets with them; None if `cols` is not a whole number of
    /// blocks.
    pub fn permute_rows(&self, cols: usize, order: &[usize]) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(self.block) || order.len() * cols != self.codes.len() {
            return None;
        }
        let per_row = cols / self.block;
        Some(Self {
            block: self.block,
            codes: rows_in_order(&self.codes, cols, order),
            scales: rows_in_order(&self.scales, per_row, order),
            offsets: self
                .offsets
                .as_deref()
                .map(|o| rows_in_order(o, per_row, order)),
        })
    }
}

/// The rows of `[_, cols]` row-major `v` in `order` (new row `i` is old row `order[i]`).
pub(crate) fn rows_in_order<T: Copy>(v: &[T], cols: usize, order: &[usize]) -> Vec<T> {
    order
        .iter()
        .flat_map(|&r| v[r * cols..(r + 1) * cols].iter().copied())
        .collect()
}

/// De-quantises `n` values of type `kind` from `raw` (which must hold exactly their blocks).
pub fn dequantize(kind: GgmlType, raw: &[u8], n: usize) -> std::result::Result<Vec<f32>, String> {
    let (_, block_bytes) = check_extent(kind, raw, n)?;
    let blocks = raw.chunks_exact(block_bytes);
    Ok(match kind {
        GgmlType::F32 => blocks
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => blocks
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => blocks
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => block_codes(kind, raw, n)?
            .expect("every supported type but the float ones has codes")
            .values(),
    })
}

/// The codes of `n` values of quantised type `kind` from `raw` (exactly their blocks); None for
/// the float types.
pub fn block_codes(
    kind: GgmlType,
    raw: &[u8],
    n: usize,
) -> std::result::Result<Option<BlockCodes>, String> {
    let (_, block_bytes) = check_extent(kind, raw, n)?;
    let (block, offsets) = match kind {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return Ok(None),
        GgmlType::Q6_K => (16, false),
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => (32, false),
        _ => (32, true),
    };
    let mut sink = Sink {
        codes: Vec::with_capacity(n),
        scales: Vec::with_capacity(n / block),
        offsets: Vec::with_capacity(if offsets { n / block } else { 0 }),
    };
    let blocks = raw.chunks_exact(block_bytes);
    match kind {
        GgmlType::Q4_0 => blocks.for_each(|b| q4_0(b, &mut sink)),
        GgmlType::Q4_1 => blocks.for_each(|b| q4_1(b, &mut sink)),
        GgmlType::Q5_0 => blocks.for_each(|b| q5_0(b, &mut sink)),
        GgmlType::Q5_1 => blocks.for_each(|b| q5_1(b, &mut sink)),
        GgmlType::Q8_0 => blocks.for_each(|b| q8_0(b, &mut sink)),
        GgmlType::Q4_K => blocks.for_each(|b| q4_k(b, &mut sink)),
        GgmlType::Q5_K => blocks.for_each(|b| q5_k(b, &mut sink)),
        GgmlType::Q6_K => blocks.for_each(|b| q6_k(b, &mut sink)),
        _ => unreachable!("check_extent admits exactly the types matched here"),
    }
    Ok(Some(BlockCodes {
        block,
        codes: sink.codes,
        scales: sink.scales,
        offsets: offsets.then_some(sink.offsets),
    }))
}

/// The type's (values, bytes) per block, once `raw` is checked to hold exactly `n` values.
fn check_extent(
    kind: GgmlType,
    raw: &[u8],
    n: usize,
) -> std::result::Result<(usize, usize), String> {
    let (per_block, block_bytes) = kind.block().ok_or_else(|| {
        format!(
            "type {} is not de-quantised here (supported: {})",
            kind.name(),
            GgmlType::supported_names()
        )
    })?;
    if !n.is_multiple_of(per_block) || raw.len() != n / per_block * block_bytes {
        return Err(format!(
            "{} bytes do not hold {n} values of {}",
            raw.len(),
            kind.name()
        ));
    }
    Ok((per_block, block_bytes))
}

/// Where the decoders below write: codes, and per block a scale and (for types with a minimum)
/// an offset.
struct Sink {
    codes: Vec<i8>,
    scales: Vec<f32>,
    offsets: Vec<f32>,
}

impl Sink {
    fn block(&mut self, scale: f32, offset: Option<f32>, codes: impl IntoIterator<Item = i32>) {
        self.scales.push(scale);
        self.offsets.extend(offset);
        // Every code of these types is within -32..=63 (6 bits, or 5 plus 16), so `as i8` is exact.
        self.codes.extend(codes.into_iter().map(|c| c as i8));
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

// The block layouts and arithmetic below follow ggml-quants.c's dequantize_row_* functions; each
// value is `code * scale (+ offset)`, with ggml's `d * q - m` as `q * d + (-m)`, the same in IEEE
// arithmetic.

fn low_high(qs: &[u8]) -> impl Iterator<Item = i32> + '_ {
    qs.iter()
        .map(|&q| (q & 0x0f) as i32)
        .chain(qs.iter().map(|&q| (q >> 4) as i32))
}

fn q4_0(b: &[u8], s: &mut Sink) {
    s.block(half_at(b, 0), None, low_high(&b[2..18]).map(|q| q - 8));
}

fn q4_1(b: &[u8], s: &mut Sink) {
    s.block(half_at(b, 0), Some(half_at(b, 2)), low_high(&b[4..20]));
}

/// The 32 five-bit values of a Q5_0/Q5_1 block: low nibbles and `qh`'s bits for the first 16,
/// high nibbles and `qh`'s upper bits for the rest.
fn five_bit(qh: u32, qs: &[u8]) -> impl Iterator<Item = i32> + '_ {
    let lo = (0..16).map(move |j| ((qs[j] & 0x0f) as u32 | (((qh >> j) << 4) & 0x10)) as i32);
    lo.chain((0..16).map(move |j| ((qs[j] >> 4) as u32 | ((qh >> (j + 12)) & 0x10)) as i32))
}

fn q5_0(b: &[u8], s: &mut Sink) {
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    s.block(half_at(b, 0), None, five_bit(qh, &b[6..22]).map(|q| q - 16));
}

fn q5_1(b: &[u8], s: &mut Sink) {
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    s.block(half_at(b, 0), Some(half_at(b, 2)), five_bit(qh, &b[8..24]));
}

fn q8_0(b: &[u8], s: &mut Sink) {
    s.block(
        half_at(b, 0),
        None,
        b[2..34].iter().map(|&q| (q as i8) as i32),
    );
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (d, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (d as f32, m as f32)
}

fn q4_k(b: &[u8], s: &mut Sink) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (i, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        s.block(
            d * sc1,
            Some(-(dmin * m1)),
            q.iter().map(|&v| (v & 0x0f) as i32),
        );
        s.block(
            d * sc2,
            Some(-(dmin * m2)),
            q.iter().map(|&v| (v >> 4) as i32),
        );
    }
}

fn q5_k(b: &[u8], s: &mut Sink) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    for (i, q) in ql.chunks_exact(32).enumerate() {
        let (u1, u2) = (1u8 << (2 * i), 2u8 << (2 * i));
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        s.block(
            d * sc1,
            Some(-(dmin * m1)),
            (0..32).map(|l| (q[l] & 0x0f) as i32 + if qh[l] & u1 != 0 { 16 } else { 0 }),
        );
        s.block(
            d * sc2,
            Some(-(dmin * m2)),
            (0..32).map(|l| (q[l] >> 4) as i32 + if qh[l] & u2 != 0 { 16 } else { 0 }),
        );
    }
}

/// Q6_K: two halves of 128 values, each eight sub-blocks of 16 with their own 8-bit scale.
fn q6_k(b: &[u8], s: &mut Sink) {
    let d = half_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        // Value 32 g + l of the half (g = 0..4) is code `g` of position l.
        let code = |g: usize, l: usize| -> i32 {
            let (low, shift) = match g {
                0 => (ql[l] & 0x0f, 0),
                1 => (ql[l + 32] & 0x0f, 2),
                2 => (ql[l] >> 4, 4),
                _ => (ql[l + 32] >> 4, 6),
            };
            (low | (((qh[l] >> shift) & 3) << 4)) as i32 - 32
        };
        for k in 0..8 {
            let (g, l0) = (k / 2, 16 * (k % 2));
            s.block(
                d * (sc[k] as i8) as f32,
                None,
                (l0..l0 + 16).map(|l| code(g, l)),
            );
        }
    }
}
