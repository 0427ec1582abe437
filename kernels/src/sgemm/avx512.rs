//! The AVX-512 implementation: how a product is cut between threads, the packing of the small
//! operand, and the 12 × 32 micro-kernel.

use std::arch::x86_64::{
    __m512, __mmask16, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps,
    _mm512_maskz_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
};
use std::mem::MaybeUninit;

use std::ops::Range;

use super::{Matrix, Output};

/// Columns of `C` one micro-kernel call computes: two 16-lane registers.
const NR: usize = 32;
/// Rows of `C` one micro-kernel call computes.
const MR: usize = 12;
/// Depth of one pass: a packed `B` block (`KC × NR` floats, 32 KiB) stays in L1.
const KC: usize = 256;
/// Below this many multiply-adds the product runs on the calling thread.
const SERIAL_BELOW: usize = 1 << 18;

/// `A·B` (see [`super::multiply`]; the caller has checked the shapes and the CPU).
pub(crate) fn multiply(a: Matrix<'_>, b: Matrix<'_>, output: Output, parallel: bool) -> Vec<f32> {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let mut c: Vec<MaybeUninit<f32>> = Vec::with_capacity(m * n);
    // SAFETY: MaybeUninit needs no initialisation; every element is written below.
    unsafe { c.set_len(m * n) };
    if k == 0 {
        c.fill(MaybeUninit::new(0.0));
    } else {
        let plan = Plan::new(m, n, k, output, parallel);
        let target = SharedOut(c.as_mut_ptr().cast::<f32>());
        let run = |part: usize| {
            // SAFETY: parts write disjoint tiles of `c`, which holds m·n floats; the slices
            // hold their shapes (asserted above); the CPU has AVX-512 (asserted above).
            unsafe { plan.run_part(part, a.values, b, target) }
        };
        crate::pool::run_parts(plan.parts, &run);
    }
    let mut c = std::mem::ManuallyDrop::new(c);
    // SAFETY: every element was written (each tile's first depth pass stores without reading),
    // and MaybeUninit<f32> has f32's layout, so the allocation is a valid Vec<f32>.
    unsafe { Vec::from_raw_parts(c.as_mut_ptr().cast::<f32>(), c.len(), c.capacity()) }
}

/// The output pointer, shared by parts that write disjoint tiles.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: parts write disjoint elements and `run_parts` joins them before the buffer is read.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// How the product is cut between threads and ordered within one.
struct Plan {
    m: usize,
    n: usize,
    k: usize,
    output: Output,
    /// Each part takes a slice of column panels (`true`) or of row blocks.
    split_columns: bool,
    parts: usize,
}

impl Plan {
    fn new(m: usize, n: usize, k: usize, output: Output, parallel: bool) -> Self {
        let threads = if !parallel || m * n * k < SERIAL_BELOW {
            1
        } else {
            crate::pool::threads()
        };
        let panels = n.div_ceil(NR);
        let blocks = m.div_ceil(MR);
        let split_columns = panels >= 2 * threads || panels >= blocks;
        let parts = threads
            .min(if split_columns { panels } else { blocks })
            .max(1);
        Self {
            m,
            n,
            k,
            output,
            split_columns,
            parts,
        }
    }

    /// Computes part `part`'s tiles.
    ///
    /// # Safety
    /// `a` holds `m·k` floats, `b` is `k × n`, `c` points to `m·n` writable floats no other part
    /// writes in this part's tiles, and the CPU has AVX-512.
    #[target_feature(enable = "avx512f")]
    unsafe fn run_part(&self, part: usize, a: &[f32], b: Matrix<'_>, c: SharedOut) {
        let (m, n, k) = (self.m, self.n, self.k);
        let (panels, blocks) = (n.div_ceil(NR), m.div_ceil(MR));
        let share = |count: usize| count * part / self.parts..count * (part + 1) / self.parts;
        let (rows, cols) = if self.split_columns {
            (0..blocks, share(panels))
        } else {
            (share(blocks), 0..panels)
        };
        let ldc = match self.output {
            Output::RowMajor => n,
            Output::Transposed => m,
        };
        let tile = |i0: usize, j0: usize| match self.output {
            // SAFETY (both): i0 < m and j0 < n, so the offset lies inside `c`.
            Output::RowMajor => unsafe { c.0.add(i0 * n + j0) },
            Output::Transposed => unsafe { c.0.add(j0 * m + i0) },
        };
        let transposed = self.output == Output::Transposed;

        if rows.len() * MR > cols.len() * NR {
            // A is the larger operand (a weight read as `W·Xᵀ`): pack this part's columns of
            // B once; A is read from memory once, a row block and depth pass at a time, packed
            // into L1 and run against every panel.
            let mut packed_b = Scratch::take(Scratch::B, cols.len() * k * NR);
            pack_b_panels(b, 0, k, cols.clone(), &mut packed_b);
            let mut packed_a = Scratch::take(Scratch::A, MR * KC);
            // A transposed output keeps its partial sums row-major (one row block, all this
            // part's panels) until the last depth pass, which adds them and stores once:
            // accumulating into the transposed layout was a scalar read-modify-write per
            // element and pass.
            let partial_ld = cols.len() * NR;
            let mut partial =
                Scratch::take(Scratch::C, if transposed { MR * partial_ld } else { 0 });
            let partial_at = SharedOut(partial.as_mut_ptr());
            for block in rows {
                let i0 = block * MR;
                let height = MR.min(m - i0);
                for p0 in (0..k).step_by(KC) {
                    let depth = KC.min(k - p0);
                    let last = p0 + depth == k;
                    pack_a(a, m, k, i0, p0, depth, &mut packed_a);
                    for (q, panel) in cols.clone().enumerate() {
                        let j0 = panel * NR;
                        // Only a transposed output has partial sums; q·NR < partial_ld keeps
                        // this tile's inside them.
                        let partial_tile = || {
                            // SAFETY: `partial` holds MR · partial_ld floats when transposed.
                            unsafe { partial_at.0.add(q * NR) }
                        };
                        let (c, ldc, to_transposed, accumulate, from_partial) =
                            match (transposed, last) {
                                (false, _) => (tile(i0, j0), ldc, false, p0 > 0, None),
                                (true, false) => (partial_tile(), partial_ld, false, p0 > 0, None),
                                (true, true) => (
                                    tile(i0, j0),
                                    ldc,
                                    true,
                                    false,
                                    (p0 > 0).then(|| partial_tile().cast_const()),
                                ),
                            };
                        let kernel = Kernel {
                            depth,
                            a: packed_a.as_ptr(),
                            b: packed_b[q * k * NR + p0 * NR..].as_ptr(),
                            width: NR.min(n - j0),
                            c,
                            ldc,
                            transposed: to_transposed,
                            accumulate,
                            partial: from_partial,
                            partial_ld,
                        };

                        // SAFETY: the pointers cover `depth` packed rows of A and of B and the
                        // tile of C.
                        unsafe { kernel.run(height) };
                    }
                }
            }
        } else {
            // B is the larger operand (a weight read as `X·W`): for one depth pass, pack A's
            // rows and this part's panels of B, then run every panel against every row block.
            let mut packed_a = Scratch::take(Scratch::A, rows.len() * MR * KC);
            let mut packed_b = Scratch::take(Scratch::B, cols.len() * KC * NR);
            for p0 in (0..k).step_by(KC) {
                let depth = KC.min(k - p0);
                for (q, block) in rows.clone().enumerate() {
                    pack_a(a, m, k, block * MR, p0, depth, &mut packed_a[q * MR * KC..]);
                }
                pack_b_panels(b, p0, depth, cols.clone(), &mut packed_b);
                for (panel_index, panel) in cols.clone().enumerate() {
                    let j0 = panel * NR;
                    let panel_b = &packed_b[panel_index * depth * NR..];
                    for (q, block) in rows.clone().enumerate() {
                        let i0 = block * MR;
                        let kernel = Kernel {
                            depth,
                            a: packed_a[q * MR * KC..].as_ptr(),
                            b: panel_b.as_ptr(),
                            width: NR.min(n - j0),
                            c: tile(i0, j0),
                            ldc,
                            transposed,
                            accumulate: p0 > 0,
                            partial: None,
                            partial_ld: 0,
                        };
                        // SAFETY: as above.
                        unsafe { kernel.run(MR.min(m - i0)) };
                    }
                }
            }
        }
    }
}

/// A packing buffer borrowed from the thread's own and given back when dropped: a training
/// step multiplies about 400 times, and allocating (and zeroing) fresh buffers each time cost
/// page faults and a `memset` of up to 800 KB per product.
struct Scratch {
    which: usize,
    buffer: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

impl Scratch {
    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;

    /// At least `len` floats (their values are whatever the last product left: packing
    /// writes every value the kernel reads).
    fn take(which: usize, len: usize) -> Self {
        let mut buffer = SCRATCH.with(|s| std::mem::take(&mut s.borrow_mut()[which]));
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
        Self { which, buffer }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buffer
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buffer
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.buffer);
        let which = self.which;
        // A thread being torn down has no scratch left to return to; the buffer is freed.
        let _ = SCRATCH.try_with(|s| s.borrow_mut()[which] = buffer);
    }
}

/// Copies rows `p0 .. p0+depth` of B's column panels `panels` to `out` as
/// `[panel][depth][NR]`, zeros past column `n`.
///
/// A row-major B (a weight) is read one whole row segment at a time: reading it panel by panel
/// touched 128 bytes per row at a stride of the row length, which the hardware prefetchers do
/// not follow, and made packing a sixth of a training step. A column-major B (an activation
/// read transposed, `dY` in `W·dYᵀ`) is gathered here rather than transposed in a pass of its
/// own.
fn pack_b_panels(b: Matrix<'_>, p0: usize, depth: usize, panels: Range<usize>, out: &mut [f32]) {
    let (first, count) = (panels.start, panels.len());
    let out = &mut out[..count * depth * NR];
    let j_start = first * NR;
    let j_end = b.cols.min(panels.end * NR);
    if j_end - j_start < count * NR {
        out.fill(0.0);
    }
    if b.column_major {
        for j in j_start..j_end {
            let (panel, lane) = ((j - j_start) / NR, (j - j_start) % NR);
            let column = &b.values[j * b.rows + p0..][..depth];
            let dst = &mut out[panel * depth * NR..][..depth * NR];
            for (p, &v) in column.iter().enumerate() {
                dst[p * NR + lane] = v;
            }
        }
        return;
    }
    for p in 0..depth {
        let row = &b.values[(p0 + p) * b.cols + j_start..(p0 + p) * b.cols + j_end];
        for (panel, src) in row.chunks(NR).enumerate() {
            let dst = &mut out[(panel * depth + p) * NR..][..NR];
            // A fixed-size copy compiles to two vector moves; a slice copy of 32 floats is a
            // `memcpy` call.
            match (
                <&mut [f32; NR]>::try_from(&mut *dst),
                <&[f32; NR]>::try_from(src),
            ) {
                (Ok(dst), Ok(src)) => *dst = *src,
                _ => dst[..src.len()].copy_from_slice(src),
            }
        }
    }
}

/// Copies `A[i0 .. i0+MR][p0 .. p0+depth]` to `out` as `[MR][KC]` (row `r` at `r·KC`), zeros
/// past row `m`: plain row copies, and the kernel's broadcasts of `A[r][p]` sit at the
/// compile-time offsets `r·KC` from one moving pointer.
fn pack_a(a: &[f32], m: usize, k: usize, i0: usize, p0: usize, depth: usize, out: &mut [f32]) {
    let height = MR.min(m - i0);
    for (r, dst) in out.chunks_exact_mut(KC).take(MR).enumerate() {
        if r < height {
            dst[..depth].copy_from_slice(&a[(i0 + r) * k + p0..][..depth]);
        } else {
            dst[..depth].fill(0.0);
        }
    }
}

/// One micro-kernel call: a `height × width` tile of `C` from `depth` rank-1 updates.
struct Kernel {
    depth: usize,
    /// `[MR][KC]`: `A[r][p]` at `a + r·KC + p`.
    a: *const f32,
    /// `[depth][NR]`, zero past `width`.
    b: *const f32,
    width: usize,
    c: *mut f32,
    ldc: usize,
    transposed: bool,
    /// Add to `C` instead of storing (every depth pass after the first).
    accumulate: bool,
    /// Row-major partial sums (`partial_ld` apart) to add before a transposed store.
    partial: Option<*const f32>,
    partial_ld: usize,
}

impl Kernel {
    /// # Safety
    /// The pointers cover what the fields describe, `height <= MR`, and the CPU has AVX-512.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, height: usize) {
        macro_rules! rows {
            ($($h:literal)*) => {
                match height {
                    // SAFETY: forwarded from the caller.
                    $($h => unsafe { self.tile::<$h>() },)*
                    _ => unreachable!("a tile has 1 to {MR} rows"),
                }
            };
        }
        rows!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// # Safety
    /// As [`Self::run`] with `H` rows.
    #[inline(always)]
    unsafe fn tile<const H: usize>(&self) {
        // SAFETY: intrinsics need AVX-512 (the caller's target feature); every pointer stays
        // inside the ranges the caller vouches for.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; H];
            let mut a = self.a;
            let mut b = self.b;
            for _ in 0..self.depth {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * KC));
                    acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                }
                a = a.add(1);
                b = b.add(NR);
            }
            if self.transposed {
                self.store_transposed(&acc);
            } else {
                self.store(&acc);
            }
        }
    }

    #[inline(always)]
    unsafe fn store<const H: usize>(&self, acc: &[[__m512; 2]; H]) {
        let lanes = |count: usize| -> __mmask16 {
            if count >= 16 {
                0xFFFF
            } else {
                ((1u32 << count) - 1) as u16
            }
        };
        let (m0, m1) = (lanes(self.width), lanes(self.width.saturating_sub(16)));
        // SAFETY: row r of the tile starts at c + r·ldc and has `width` valid columns.
        unsafe {
            for (r, acc) in acc.iter().enumerate() {
                let c = self.c.add(r * self.ldc);
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if self.accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c.add(16)));
                }
                _mm512_mask_storeu_ps(c, m0, v0);
                _mm512_mask_storeu_ps(c.add(16), m1, v1);
            }
        }
    }

    /// Writes the tile column by column, adding the row-major partial sums first when there are
    /// some. The scalar transpose is paid once per tile; accumulating into the transposed layout
    /// (`accumulate`) is left to the rare product whose weight is the small operand.
    #[inline(always)]
    unsafe fn store_transposed<const H: usize>(&self, acc: &[[__m512; 2]; H]) {
        let mut tile = [[0.0f32; NR]; H];
        // SAFETY: each row of `tile` holds NR = 32 floats; column j of the tile is row j of the
        // transposed output, at c + j·ldc, with H valid entries.
        unsafe {
            for (row, acc) in tile.iter_mut().zip(acc) {
                _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
                _mm512_storeu_ps(row.as_mut_ptr().add(16), acc[1]);
            }
            if let Some(partial) = self.partial {
                for (r, row) in tile.iter_mut().enumerate() {
                    let from = partial.add(r * self.partial_ld);
                    _mm512_storeu_ps(
                        row.as_mut_ptr(),
                        _mm512_add_ps(_mm512_loadu_ps(row.as_ptr()), _mm512_loadu_ps(from)),
                    );
                    _mm512_storeu_ps(
                        row.as_mut_ptr().add(16),
                        _mm512_add_ps(
                            _mm512_loadu_ps(row.as_ptr().add(16)),
                            _mm512_loadu_ps(from.add(16)),
                        ),
                    );
                }
            }
            for j in 0..self.width {
                let c = self.c.add(j * self.ldc);
                for (r, row) in tile.iter().enumerate() {
                    if self.accumulate {
                        *c.add(r) += row[j];
                    } else {
                        *c.add(r) = row[j];
                    }
                }
            }
        }
    }
}
