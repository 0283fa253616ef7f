//! Linear weights kept as a quantised checkpoint's own integer codes, for decode steps on host
//! backends.
//!
//! A batch-1 decode step reads every weight once, so its speed is the bytes it reads. A GGUF
//! checkpoint de-quantised to f32 reads 4 bytes a weight; its Q4_1 codes with their block scales
//! read 0.75. [`PackedMatrix`] holds those codes, and [`project`] multiplies a few rows by them,
//! de-quantising each block in registers to exactly the f32 values the loader gave the
//! `Linear` (same operations, same rounding), so the two paths differ only in summation order.
//! Prefill (many rows) stays on the backend's GEMM over the f32 weights.

use crate::Isa;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use kv_core::readback::ReadBack;
use kv_core::{KvError, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Values per block (one scale, one optional offset): the block size of GGUF's 32-value types.
pub const PACKED_BLOCK: usize = 32;

/// The most input rows (batch x tokens) [`project`] takes through the packed weights; more go
/// to the backend's GEMM, which reuses each weight across rows.
pub const PACKED_MAX_ROWS: usize = 4;

/// How a [`PackedMatrix`] stores its codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeWidth {
    /// Two codes a byte, each `nibble + shift` (shift 0 or -8): Q4_0, Q4_1, Q4_K.
    Nibbles {
        /// Added to the stored nibble to give the code.
        shift: i8,
    },
    /// One signed byte a code: Q5_*, Q8_0 and anything else within `i8`.
    Bytes,
}

/// A `[rows, cols]` weight (rows are outputs, as PyTorch and GGUF store them) held as integer
/// codes with a scale and an optional offset per block of [`PACKED_BLOCK`] values along a row:
/// `value = code as f32 * scale + offset`, exactly as the GGUF de-quantisers compute it.
#[derive(Clone)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    width: CodeWidth,
    /// Nibbles: 16 bytes a block, byte `i` holding values `i` (low) and `i + 16` (high), the
    /// layout of Q4_0/Q4_1; bytes: one `i8` a value.
    codes: Vec<u8>,
    scales: Vec<f32>,
    offsets: Option<Vec<f32>>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedMatrix {{ rows: {}, cols: {}, width: {:?}, bytes: {} }}",
            self.rows,
            self.cols,
            self.width,
            self.bytes()
        )
    }
}

impl PackedMatrix {
    /// Packs `codes` (`rows x cols`, row-major, one per value) with one scale (and offset, if
    /// any) per block of [`PACKED_BLOCK`]; nibbles when every code fits four bits.
    pub fn new(
        rows: usize,
        cols: usize,
        codes: &[i8],
        scales: Vec<f32>,
        offsets: Option<Vec<f32>>,
    ) -> Result<Self> {
        if rows == 0 || cols == 0 || !cols.is_multiple_of(PACKED_BLOCK) {
            return Err(KvError::config(
                "packed matrix cols",
                cols,
                format!("a positive multiple of {PACKED_BLOCK} (the block size), with rows > 0"),
            ));
        }
        let blocks = rows * cols / PACKED_BLOCK;
        if codes.len() != rows * cols
            || scales.len() != blocks
            || offsets.as_ref().is_some_and(|o| o.len() != blocks)
        {
            return Err(KvError::config(
                "packed matrix parts",
                format!(
                    "{} codes, {} scales, {:?} offsets",
                    codes.len(),
                    scales.len(),
                    offsets.as_ref().map(Vec::len)
                ),
                format!(
                    "{} codes and {blocks} scales (and offsets) for {rows} x {cols}",
                    rows * cols
                ),
            ));
        }
        let (lo, hi) = codes
            .iter()
            .fold((i8::MAX, i8::MIN), |(lo, hi), &c| (lo.min(c), hi.max(c)));
        let shift = if lo >= 0 && hi <= 15 {
            Some(0)
        } else if lo >= -8 && hi <= 7 {
            Some(-8)
        } else {
            None
        };
        let (width, packed) = match shift {
            Some(shift) => {
                let nibble = |c: i8| (c - shift) as u8;
                let packed = codes
                    .chunks_exact(PACKED_BLOCK)
                    .flat_map(|b| {
                        (0..PACKED_BLOCK / 2)
                            .map(move |i| nibble(b[i]) | (nibble(b[i + PACKED_BLOCK / 2]) << 4))
                    })
                    .collect();
                (CodeWidth::Nibbles { shift }, packed)
            }
            None => (CodeWidth::Bytes, codes.iter().map(|&c| c as u8).collect()),
        };
        Ok(Self {
            rows,
            cols,
            width,
            codes: packed,
            scales,
            offsets,
        })
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// How the codes are stored.
    pub fn width(&self) -> CodeWidth {
        self.width
    }

    /// Bytes held: codes, scales and offsets.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len() + self.offsets.as_ref().map_or(0, |o| 4 * o.len())
    }

    /// The f32 values, `[rows, cols]` row-major: what the GGUF de-quantiser gives, bit for bit.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (b, chunk) in out.chunks_exact_mut(PACKED_BLOCK).enumerate() {
            let (scale, offset) = (self.scales[b], self.offsets.as_ref().map(|o| o[b]));
            for (j, v) in chunk.iter_mut().enumerate() {
                let w = self.code(b, j) as f32 * scale;
                *v = offset.map_or(w, |o| w + o);
            }
        }
        out
    }

    fn code(&self, block: usize, j: usize) -> i32 {
        match self.width {
            CodeWidth::Nibbles { shift } => {
                let byte = self.codes[block * PACKED_BLOCK / 2 + j % (PACKED_BLOCK / 2)];
                let nibble = if j < PACKED_BLOCK / 2 {
                    byte & 0x0f
                } else {
                    byte >> 4
                };
                nibble as i32 + shift as i32
            }
            CodeWidth::Bytes => self.codes[block * PACKED_BLOCK + j] as i8 as i32,
        }
    }

    /// `x W^T` for `x` `[m, cols]` row-major (`1 <= m <= PACKED_MAX_ROWS`): `[m, rows]`, over
    /// rayon's pool with `isa`'s build (the widest this CPU runs at or below it). None for
    /// another `m` or a length that is not `m x cols`.
    pub fn matmul_rows(&self, x: &[f32], m: usize, isa: Isa) -> Option<Vec<f32>> {
        let isa = isa.usable();
        if !(1..=PACKED_MAX_ROWS).contains(&m) || x.len() != m * self.cols {
            return None;
        }
        // Rows in chunks of at least 64 (a chunk's codes are several KB), enough chunks to
        // balance the pool.
        let chunk = self.rows.div_ceil(4 * rayon::current_num_threads()).max(64);
        let mut by_row = vec![0f32; self.rows * m];
        by_row
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(i, out)| match m {
                1 => rows_span::<1>(self, x, i * chunk, out, isa),
                2 => rows_span::<2>(self, x, i * chunk, out, isa),
                3 => rows_span::<3>(self, x, i * chunk, out, isa),
                _ => rows_span::<4>(self, x, i * chunk, out, isa),
            });
        if m == 1 {
            return Some(by_row);
        }
        let mut out = vec![0f32; m * self.rows];
        for (r, vals) in by_row.chunks_exact(m).enumerate() {
            for (i, &v) in vals.iter().enumerate() {
                out[i * self.rows + r] = v;
            }
        }
        Some(out)
    }
}

/// Packed copies of a module's `N` projection weights, in the order its docs give, shared by its
/// clones; empty for a module built or trained here (only a loader fills it).
#[derive(Debug, Clone, Default)]
pub struct PackedSet<const N: usize>(Option<Arc<[PackedMatrix; N]>>);

impl<const N: usize> PackedSet<N> {
    /// A set holding these matrices.
    pub fn new(matrices: [PackedMatrix; N]) -> Self {
        Self(Some(Arc::new(matrices)))
    }

    /// Matrix `i`, if the set holds any.
    pub fn get(&self, i: usize) -> Option<&PackedMatrix> {
        self.0.as_ref().and_then(|m| m.get(i))
    }

    /// Whether the set holds matrices.
    pub fn is_packed(&self) -> bool {
        self.0.is_some()
    }

    /// Bytes its matrices hold.
    pub fn bytes(&self) -> usize {
        self.0
            .as_ref()
            .map_or(0, |m| m.iter().map(PackedMatrix::bytes).sum())
    }

    /// Weights its matrices hold.
    pub fn values(&self) -> usize {
        self.0
            .as_ref()
            .map_or(0, |m| m.iter().map(|m| m.rows * m.cols).sum())
    }
}

/// `linear(x)` for `x` `[b, t, in]`: through `packed` (the same weight as codes) when it is
/// given, the host kernels are on ([`crate::Kernels`]), no autodiff graph is recorded,
/// `x` is f32 and `b x t <= PACKED_MAX_ROWS` (a decode step); through the `Linear` otherwise.
pub fn project<B: Backend>(
    linear: &Linear<B>,
    packed: Option<&PackedMatrix>,
    x: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let fits = packed.filter(|p| linear.weight.dims() == [p.cols(), p.rows()]);
    match fits.and_then(|p| project_packed(p, &x)) {
        Some(y) => match &linear.bias {
            Some(bias) => y + bias.val().unsqueeze::<3>(),
            None => y,
        },
        None => linear.forward(x),
    }
}

/// `x W^T` through `packed` for `x` `[b, t, cols]`, when the conditions of [`project`] hold.
pub fn project_packed<B: Backend>(packed: &PackedMatrix, x: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
    let [b, t, cols] = x.dims();
    let device = x.device();
    if b * t > PACKED_MAX_ROWS
        || cols != packed.cols()
        || x.dtype() != DType::F32
        || !crate::attend::host_kernels_on::<B>(&device)
    {
        return None;
    }
    let data = x.clone().host_data();
    let out = packed.matmul_rows(
        data.as_slice::<f32>().ok()?,
        b * t,
        crate::Kernels::current().isa,
    )?;
    #[cfg(test)]
    crate::attend::served::count(crate::attend::served::Kernel::Packed);
    Some(Tensor::from_data(
        TensorData::new(out, [b, t, packed.rows()]),
        &device,
    ))
}

/// Rows `first ..` of `mat` (as many as `out` holds, `M` values each) times the `M` rows of `x`,
/// with `isa`'s build (one [`Isa::usable`] returned).
fn rows_span<const M: usize>(
    mat: &PackedMatrix,
    x: &[f32],
    first: usize,
    out: &mut [f32],
    isa: Isa,
) {
    let rows = out.len() / M;
    assert!(
        first + rows <= mat.rows && x.len() == M * mat.cols,
        "rows_span: rows {first}+{rows} of {}, x {}",
        mat.rows,
        x.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let nibbles = matches!(mat.width, CodeWidth::Nibbles { .. });
            // SAFETY: `isa` came from `Isa::usable`, so this CPU has AVX-512F, AVX2 and FMA; the
            // rows and x were checked against the matrix above.
            unsafe {
                match (nibbles, mat.offsets.is_some()) {
                    (true, true) => x86::rows::<M, true, true>(mat, x, first, out),
                    (true, false) => x86::rows::<M, true, false>(mat, x, first, out),
                    (false, true) => x86::rows::<M, false, true>(mat, x, first, out),
                    (false, false) => x86::rows::<M, false, false>(mat, x, first, out),
                }
            }
        }
        // SAFETY: as above, AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { rows_avx2::<M>(mat, x, first, out) },
        _ => rows_lanes::<M, false>(mat, x, first, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_avx2<const M: usize>(mat: &PackedMatrix, x: &[f32], first: usize, out: &mut [f32]) {
    rows_lanes::<M, true>(mat, x, first, out)
}

/// The AVX-512 kernel, in intrinsics: the compiler does not keep the portable version's
/// de-quantised halves in registers.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PACKED_BLOCK, PackedMatrix};
    use std::arch::x86_64::*;

    /// Per row, each block's two halves of 16 de-quantised in registers and accumulated against
    /// each input row in two chains. A nibble block's 16 possible values (`code * scale`, then
    /// `+ offset`: two roundings, as the de-quantiser's) fill one register, which a permute
    /// indexes by each code's low four bits; a byte block converts and scales its codes.
    ///
    /// # Safety
    /// The CPU supports AVX-512F, AVX2 and FMA; rows `first .. first + out.len() / M` exist in `mat` and `x`
    /// holds `M x mat.cols` values.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn rows<const M: usize, const NIBBLES: bool, const OFFSETS: bool>(
        mat: &PackedMatrix,
        x: &[f32],
        first: usize,
        out: &mut [f32],
    ) {
        let cols = mat.cols;
        let blocks = cols / PACKED_BLOCK;
        let shift = match mat.width {
            super::CodeWidth::Nibbles { shift } => shift as f32,
            super::CodeWidth::Bytes => 0.0,
        };
        // The codes a nibble stands for, 0..16 plus the shift.
        let codes_of_nibbles = _mm512_add_ps(
            _mm512_setr_ps(
                0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                15.0,
            ),
            _mm512_set1_ps(shift),
        );
        let (codes, scales, xp) = (mat.codes.as_ptr(), mat.scales.as_ptr(), x.as_ptr());
        let offsets = mat
            .offsets
            .as_ref()
            .map_or(std::ptr::null(), |o| o.as_ptr());
        for (i, o) in out.chunks_exact_mut(M).enumerate() {
            let row = first + i;
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            for blk in 0..blocks {
                let b = row * blocks + blk;
                // SAFETY (all reads below): block `b` is within the matrix, and x's rows within x.
                let (wl, wh) = unsafe {
                    let scale = _mm512_set1_ps(*scales.add(b));
                    let dequantize = |c: __m512| {
                        let w = _mm512_mul_ps(c, scale);
                        if OFFSETS {
                            _mm512_add_ps(w, _mm512_set1_ps(*offsets.add(b)))
                        } else {
                            w
                        }
                    };
                    if NIBBLES {
                        let table = dequantize(codes_of_nibbles);
                        // The permute reads each lane's low four bits: the low nibble as loaded,
                        // the high one after a shift.
                        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                            codes.add(b * 16) as *const __m128i
                        ));
                        (
                            _mm512_permutexvar_ps(bytes, table),
                            _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table),
                        )
                    } else {
                        let p = codes.add(b * 32) as *const __m128i;
                        let convert =
                            |q: __m128i| dequantize(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
                        (
                            convert(_mm_loadu_si128(p)),
                            convert(_mm_loadu_si128(p.add(1))),
                        )
                    }
                };
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: row r of x holds cols values, and this block's 32 are within them.
                    unsafe {
                        let xr = xp.add(r * cols + blk * PACKED_BLOCK);
                        a[0] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xr), a[0]);
                        a[1] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xr.add(16)), a[1]);
                    }
                }
            }
            for (v, a) in o.iter_mut().zip(&acc) {
                *v = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            }
        }
    }
}

/// Sixteen lanes, so each lane-wise step compiles to one AVX-512 instruction (two with AVX2).
type V = [f32; LANES];
const LANES: usize = 16;

/// The portable kernel (AVX2 and others), the AVX-512 one's arithmetic: per row, each block's two
/// halves de-quantised (`code * scale`, then `+ offset`: two roundings, as the
/// de-quantiser's) and accumulated against each input row, in two chains to hide FMA latency.
#[inline(always)]
fn rows_lanes<const M: usize, const FMA: bool>(
    mat: &PackedMatrix,
    x: &[f32],
    first: usize,
    out: &mut [f32],
) {
    let cols = mat.cols;
    let blocks = cols / PACKED_BLOCK;
    for (i, o) in out.chunks_exact_mut(M).enumerate() {
        let row = first + i;
        let mut acc = [[[0f32; LANES]; 2]; M];
        for blk in 0..blocks {
            let b = row * blocks + blk;
            let scale = mat.scales[b];
            let halves: [V; 2] = match mat.width {
                CodeWidth::Nibbles { shift } => {
                    let bytes: &[u8; 16] = mat.codes[b * 16..b * 16 + 16].try_into().unwrap();
                    let s = shift as i32;
                    [
                        std::array::from_fn(|l| ((bytes[l] & 0x0f) as i32 + s) as f32 * scale),
                        std::array::from_fn(|l| ((bytes[l] >> 4) as i32 + s) as f32 * scale),
                    ]
                }
                CodeWidth::Bytes => {
                    let bytes: &[u8; 32] = mat.codes[b * 32..b * 32 + 32].try_into().unwrap();
                    [
                        std::array::from_fn(|l| bytes[l] as i8 as f32 * scale),
                        std::array::from_fn(|l| bytes[l + 16] as i8 as f32 * scale),
                    ]
                }
            };
            let w = match &mat.offsets {
                Some(off) => {
                    let o = off[b];
                    halves.map(|h| h.map(|v| v + o))
                }
                None => halves,
            };
            let base = blk * PACKED_BLOCK;
            for (r, acc) in acc.iter_mut().enumerate() {
                let xr = &x[r * cols + base..r * cols + base + PACKED_BLOCK];
                for (h, a) in acc.iter_mut().enumerate() {
                    let xv: &[f32; LANES] = xr[h * LANES..h * LANES + LANES].try_into().unwrap();
                    *a = std::array::from_fn(|l| {
                        if FMA {
                            w[h][l].mul_add(xv[l], a[l])
                        } else {
                            w[h][l] * xv[l] + a[l]
                        }
                    });
                }
            }
        }
        for (r, v) in o.iter_mut().enumerate() {
            *v = (0..LANES).map(|l| acc[r][0][l] + acc[r][1][l]).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random codes in `lo..=hi`, scales and offsets.
    fn parts(
        rows: usize,
        cols: usize,
        lo: i32,
        hi: i32,
        offsets: bool,
        seed: u64,
    ) -> (Vec<i8>, Vec<f32>, Option<Vec<f32>>) {
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let codes = (0..rows * cols)
            .map(|_| (lo + (next() % (hi - lo + 1) as u32) as i32) as i8)
            .collect();
        let blocks = rows * cols / PACKED_BLOCK;
        let scales = (0..blocks)
            .map(|_| (next() % 1000) as f32 * 1e-4 + 1e-3)
            .collect();
        let offsets = offsets.then(|| {
            (0..blocks)
                .map(|_| (next() % 2000) as f32 * 1e-4 - 0.1)
                .collect()
        });
        (codes, scales, offsets)
    }

    fn reference(codes: &[i8], scales: &[f32], offsets: Option<&[f32]>) -> Vec<f32> {
        codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let w = c as f32 * scales[i / PACKED_BLOCK];
                offsets.map_or(w, |o| w + o[i / PACKED_BLOCK])
            })
            .collect()
    }

    #[test]
    fn packing_keeps_every_value_bit_for_bit_in_the_narrowest_width() {
        for (lo, hi, offsets, width) in [
            (0, 15, true, CodeWidth::Nibbles { shift: 0 }),
            (-8, 7, false, CodeWidth::Nibbles { shift: -8 }),
            (-128, 127, false, CodeWidth::Bytes),
            (0, 31, true, CodeWidth::Bytes),
        ] {
            let (rows, cols) = (5, 96);
            let (codes, scales, off) = parts(rows, cols, lo, hi, offsets, 7);
            let want = reference(&codes, &scales, off.as_deref());
            let m = PackedMatrix::new(rows, cols, &codes, scales, off).unwrap();
            assert_eq!(m.width(), width, "codes {lo}..={hi}");
            let got = m.dequantize();
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "codes {lo}..={hi}"
            );
            let per_value = m.bytes() as f64 / (rows * cols) as f64;
            let expected = if matches!(width, CodeWidth::Nibbles { .. }) {
                0.5
            } else {
                1.0
            } + if offsets { 0.25 } else { 0.125 };
            assert!(
                (per_value - expected).abs() < 1e-12,
                "{per_value} bytes a value"
            );
        }
    }

    #[test]
    fn bad_parts_are_errors_that_name_them() {
        let (codes, scales, _) = parts(2, 64, 0, 15, false, 1);
        let err = PackedMatrix::new(2, 48, &codes[..96], scales.clone(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("48") && err.contains("multiple of 32"),
            "{err}"
        );
        let err = PackedMatrix::new(2, 64, &codes, scales[..3].to_vec(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("3 scales") && err.contains("4 scales"),
            "{err}"
        );
    }

    #[test]
    fn matmul_rows_matches_the_dequantised_product_within_f32_rounding() {
        for (lo, hi, offsets) in [(0, 15, true), (-8, 7, false), (-128, 127, false)] {
            let (rows, cols) = (200, 576);
            let (codes, scales, off) = parts(rows, cols, lo, hi, offsets, 3);
            let m = PackedMatrix::new(rows, cols, &codes, scales, off).unwrap();
            let w = m.dequantize();
            for (batch, isa) in (1..=PACKED_MAX_ROWS)
                .flat_map(|b| Isa::available().into_iter().map(move |i| (b, i)))
            {
                let x: Vec<f32> = (0..batch * cols)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.02)
                    .collect();
                let got = m.matmul_rows(&x, batch, isa).unwrap();
                for r in 0..batch {
                    for o in 0..rows {
                        let (mut exact, mut mag) = (0f64, 0f64);
                        for c in 0..cols {
                            let p = w[o * cols + c] as f64 * x[r * cols + c] as f64;
                            exact += p;
                            mag += p.abs();
                        }
                        let err = (got[r * rows + o] as f64 - exact).abs();
                        assert!(
                            err <= 1e-6 * mag + 1e-30,
                            "{isa}: codes {lo}..={hi}, m {batch}, row {r}, out {o}: {} vs {exact}",
                            got[r * rows + o]
                        );
                    }
                }
            }
            assert!(
                m.matmul_rows(&vec![0.0; 5 * cols], 5, Isa::best())
                    .is_none(),
                "more rows than PACKED_MAX_ROWS go to the GEMM"
            );
            assert!(
                m.matmul_rows(&vec![0.0; cols - 1], 1, Isa::best())
                    .is_none()
            );
        }
    }

    #[test]
    fn project_takes_the_packed_weights_for_a_few_rows_only_and_adds_the_bias() {
        use crate::attend::served::{Kernel, calls};
        use burn::module::Param;
        use burn::nn::LinearConfig;
        use burn::tensor::Distribution;
        type B = burn::backend::Flex;
        let dev = Default::default();
        let (rows, cols) = (48, 64);
        let (codes, scales, off) = parts(rows, cols, 0, 15, true, 11);
        let m = PackedMatrix::new(rows, cols, &codes, scales, off).unwrap();
        let w = Tensor::<B, 2>::from_data(TensorData::new(m.dequantize(), [rows, cols]), &dev);
        let mut linear = LinearConfig::new(cols, rows)
            .with_bias(true)
            .init::<B>(&dev);
        linear.weight = Param::from_tensor(w.transpose());
        let calls = || calls(Kernel::Packed);
        for (b, t) in [(1, 1), (2, 2), (1, 4), (5, 1), (1, 8)] {
            let x = Tensor::<B, 3>::random([b, t, cols], Distribution::Uniform(-1.0, 1.0), &dev);
            let before = calls();
            let got = crate::with_host_kernels(true, || project(&linear, Some(&m), x.clone()));
            assert_eq!(
                calls() - before,
                usize::from(b * t <= PACKED_MAX_ROWS),
                "{b} x {t} rows"
            );
            let want = linear.forward(x);
            let diff: f32 = (got - want).abs().max().into_scalar();
            assert!(diff <= 1e-5, "{b} x {t}: max abs diff {diff}");
        }
        // A packed matrix of another shape, or the host kernels off: the Linear alone.
        let x = Tensor::<B, 3>::random([1, 1, cols], Distribution::Uniform(-1.0, 1.0), &dev);
        let (other_codes, other_scales, _) = parts(rows + 1, cols, 0, 15, false, 2);
        let other = PackedMatrix::new(rows + 1, cols, &other_codes, other_scales, None).unwrap();
        let before = calls();
        let _ = crate::with_host_kernels(true, || project(&linear, Some(&other), x.clone()));
        let _ = crate::with_host_kernels(false, || project(&linear, Some(&m), x));
        assert_eq!(calls(), before);
    }
}
