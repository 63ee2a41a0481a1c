//! Strided matrices and the f32 product over them (the `gemm` crate, the kernels behind
//! candle's own `matmul`), shared by the convolutions and the bf16 products.

use gemm::Parallelism;

/// A strided matrix: element `(r, c)` of `data` is at `r * rs + c * cs`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Rows of contiguous elements, `rs` apart.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// The transpose, as a view of the same elements.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// A strided mutable matrix, as [`Mat`].
#[derive(Debug)]
pub struct MatMut<'a> {
    /// The elements.
    pub data: &'a mut [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> MatMut<'a> {
    /// Rows of contiguous elements, `rs` apart.
    pub fn rows(data: &'a mut [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// The transpose, as a view of the same elements.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// The index of the last element an `rows × cols` matrix with these strides addresses.
pub(crate) fn last_index(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    (rows - 1) * rs + (cols - 1) * cs
}

/// Checks that the strides of a product's matrices stay inside their slices (`a: None`: a left
/// operand checked when it was packed) and does the empty products' work (nothing, or zeroing `dst` when `k = 0` without accumulation); returns
/// whether a product of positive sizes remains to be computed.
///
/// # Panics
/// If a stride addresses an element outside its slice.
pub(crate) fn check_product(
    what: &str,
    (m, n, k): (usize, usize, usize),
    dst: &mut MatMut,
    accumulate: bool,
    a: Option<&Mat>,
    b: &Mat,
) -> bool {
    if m == 0 || n == 0 {
        return false;
    }
    assert!(
        last_index(m, n, dst.rs, dst.cs) < dst.data.len(),
        "{what}: dst out of bounds"
    );
    // Distinct (row, column) pairs must be distinct elements: the products write blocks of the
    // destination from several threads.
    assert!(
        m == 1 || n == 1 || dst.rs >= n * dst.cs || dst.cs >= m * dst.rs,
        "{what}: dst elements overlap (strides {} and {})",
        dst.rs,
        dst.cs
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    dst.data[r * dst.rs + c * dst.cs] = 0.0;
                }
            }
        }
        return false;
    }
    if let Some(a) = a {
        assert!(
            last_index(m, k, a.rs, a.cs) < a.data.len(),
            "{what}: lhs out of bounds"
        );
    }
    assert!(
        last_index(k, n, b.rs, b.cs) < b.data.len(),
        "{what}: rhs out of bounds"
    );
    true
}

/// `dst (m×n) = [dst +] a (m×k) · b (k×n)` in f32.
///
/// # Panics
/// If a stride addresses an element outside its slice.
pub fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: MatMut,
    accumulate: bool,
    a: Mat,
    b: Mat,
    parallelism: Parallelism,
) {
    let mut dst = dst;
    if !check_product("gemm", (m, n, k), &mut dst, accumulate, Some(&a), &b) {
        return;
    }
    // SAFETY: `check_product` keeps every element the strides address inside its slice; dst
    // is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
