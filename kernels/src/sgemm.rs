//! A single-precision matrix product for x86-64 CPUs with AVX-512, shaped for what a training
//! step on a frozen model multiplies: a few hundred activation rows against a large weight.
//!
//! Why by hand: burn-flex multiplies with the `gemm` crate, which packs the weight into panels
//! on every call, serially when the other operand has few rows, and gathers element by element
//! when the weight is read transposed (`dY·Wᵀ` in every backward pass). On a 2-core Xeon that
//! packing was a sixth of a LoRA step. This kernel reads the large operand where it lies, in
//! row order, and packs only the small one. Measured on a LoRA step's shapes with 2
//! threads: 220–290 GFLOP/s, against 90–260 for `gemm` on the same products.
//!
//! `C = A·B` with `A` `[m, k]` and `B` `[k, n]` both row-major; `C` is written row-major
//! `[m, n]` or, on request, transposed `[n, m]`, which lets `X·Wᵀ` run as `(W·Xᵀ)ᵀ` with the
//! weight as the streamed left operand.
//!
//! The micro-kernel keeps a 12 × 32 block of `C` in 24 of the 32 vector registers and adds one
//! rank-1 update per step of `k`: two 16-lane loads of `B`, twelve broadcasts of `A`, 24 fused
//! multiply-adds.

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Where the kernel cannot run (other architectures), [`multiply`] is never called: callers
/// check [`available`] first.
#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(crate) fn multiply(
        _: super::Matrix<'_>,
        _: super::Matrix<'_>,
        _: super::Output,
        _: bool,
    ) -> Vec<f32> {
        unreachable!("`available` is false off x86-64")
    }
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Where `C` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// `C[i][j]` at `i·n + j`.
    RowMajor,
    /// `C[i][j]` at `j·m + i`.
    Transposed,
}

/// A matrix borrowed from a slice, stored row after row or column after column.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub(crate) values: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) column_major: bool,
}

impl<'a> Matrix<'a> {
    /// `values` holds the rows one after the other.
    ///
    /// # Panics
    /// When `values` is shorter than `rows · cols`.
    pub fn row_major(values: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(values, rows, cols, false)
    }

    /// `values` holds the columns one after the other (the row-major transpose).
    ///
    /// # Panics
    /// When `values` is shorter than `rows · cols`.
    pub fn column_major(values: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(values, rows, cols, true)
    }

    fn new(values: &'a [f32], rows: usize, cols: usize, column_major: bool) -> Self {
        assert!(
            values.len() >= rows * cols,
            "a matrix needs rows × cols values"
        );
        Self {
            values,
            rows,
            cols,
            column_major,
        }
    }
}

/// `A·B` written as `output` says, split over [`crate::pool`]'s threads. `A` must be
/// row-major; `B` may be either.
///
/// # Panics
/// When the inner dimensions disagree, `A` is column-major, or the CPU lacks AVX-512 (check
/// [`available`] first).
pub fn multiply(a: Matrix<'_>, b: Matrix<'_>, output: Output) -> Vec<f32> {
    checked(a, b, output, true)
}

/// [`multiply`] on the calling thread alone: for callers that already run products in
/// parallel (one attention head per task).
///
/// # Panics
/// As [`multiply`].
pub fn multiply_serial(a: Matrix<'_>, b: Matrix<'_>, output: Output) -> Vec<f32> {
    checked(a, b, output, false)
}

fn checked(a: Matrix<'_>, b: Matrix<'_>, output: Output, parallel: bool) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "inner dimensions disagree");
    assert!(!a.column_major, "the left operand is read row by row");
    assert!(available(), "the AVX-512 kernel needs an AVX-512 CPU");
    avx512::multiply(a, b, output, parallel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::values;

    /// The product in f64, row-major.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                let av = f64::from(a[i * k + p]);
                for j in 0..n {
                    c[i * n + j] += av * f64::from(b[p * n + j]);
                }
            }
        }
        c
    }

    #[test]
    fn matches_the_f64_product_on_edge_shapes_in_both_layouts() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        // Rows and columns off the 12 × 32 tile, depths off and across the 256 pass, and
        // shapes large enough to split between threads either way.
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 45, 13),
            (13, 17, 5),
            (25, 33, 800),
            (128, 96, 300),
            (600, 40, 70),
            (3, 200, 0),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let want = reference(m, n, k, &a, &b);
            let tol = 1e-5 * (k.max(1) as f64).sqrt();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let a = Matrix::row_major(&a, m, k);
            let row_major = multiply(a, Matrix::row_major(&b, k, n), Output::RowMajor);
            let transposed = multiply(a, Matrix::row_major(&b, k, n), Output::Transposed);
            let gathered = multiply(a, Matrix::column_major(&bt, k, n), Output::RowMajor);
            assert_eq!(gathered, row_major, "{m}x{n}x{k}: B read column by column");
            for i in 0..m {
                for j in 0..n {
                    let w = want[i * n + j];
                    assert!(
                        (f64::from(row_major[i * n + j]) - w).abs() <= tol,
                        "{m}x{n}x{k}"
                    );
                    assert!(
                        (f64::from(transposed[j * m + i]) - w).abs() <= tol,
                        "{m}x{n}x{k}"
                    );
                }
            }
        }
    }
}
