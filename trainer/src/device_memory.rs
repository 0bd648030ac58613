//! Peak GPU memory as libtorch's caching allocator counts it — the figure
//! `torch.cuda.max_memory_allocated()` reports, so ours and a PyTorch peer compare like for like
//! (trainer/csrc/device_memory.cpp reads it through c10's generic device allocator).

use std::ffi::{c_char, CStr};

extern "C" {
    fn ddetr_cuda_reset_peak_memory(index: i8) -> *const c_char;
    fn ddetr_cuda_peak_memory(index: i8, out: *mut u64) -> *const c_char;
}

fn check(err: *const c_char) -> Result<(), String> {
    if err.is_null() {
        Ok(())
    } else {
        // SAFETY: a NUL-terminated message owned by the calling thread until its next call.
        Err(unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned())
    }
}

/// Starts a new peak window on CUDA device `index` (`torch.cuda.reset_peak_memory_stats`).
pub fn cuda_reset_peak(index: usize) -> Result<(), String> {
    let index = i8::try_from(index).map_err(|_| format!("CUDA device index {index} too large"))?;
    // SAFETY: plain call; errors come back as a message.
    check(unsafe { ddetr_cuda_reset_peak_memory(index) })
}

/// Peak bytes allocated on CUDA device `index` since the last reset.
pub fn cuda_peak_allocated(index: usize) -> Result<u64, String> {
    let index = i8::try_from(index).map_err(|_| format!("CUDA device index {index} too large"))?;
    let mut out = 0u64;
    // SAFETY: `out` is a valid u64 for the call to write.
    check(unsafe { ddetr_cuda_peak_memory(index, &mut out) })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_read_on_a_gpu_and_fail_with_a_message_without_one() {
        if crate::cuda_runtime::cuda_available() {
            cuda_reset_peak(0).unwrap();
            let t = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, tch::Device::Cuda(0)));
            assert!(cuda_peak_allocated(0).unwrap() >= 4 << 20);
            drop(t);
        } else {
            let err = cuda_reset_peak(0).unwrap_err();
            assert!(!err.is_empty() && !err.contains('\n'), "{err}");
            let err = cuda_peak_allocated(0).unwrap_err();
            assert!(!err.is_empty() && !err.contains('\n'), "{err}");
        }
        assert!(cuda_peak_allocated(1000).is_err());
    }
}
