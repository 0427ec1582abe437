//! Reading burn-flex tensors as the slices fedtune's CPU kernels take.

use burn_flex::FlexTensor;

/// `t` laid out contiguously (copied only when it is a strided view).
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The values of a contiguous float32 tensor.
///
/// # Panics
/// When `t` is not float32 or not contiguous (callers check the type and call [`contiguous`]).
pub(crate) fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous float32 tensor")
}
