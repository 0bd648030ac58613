//! libtorch's CUDA half is loaded at run time (collective/src/cuda_runtime.rs): before the load
//! libtorch has no CUDA allocator, after it the caching allocator is registered — on this CPU
//! machine too, where it then reports that there is no device. Its own test binary: the load is
//! process-wide.

use ddetr_trainer::cuda_runtime::{driver_present, ensure_loaded, load_torch_cuda};
use ddetr_trainer::device_memory::cuda_peak_allocated;

#[test]
fn loading_libtorch_cuda_registers_its_allocator() {
    let before = cuda_peak_allocated(0).unwrap_err();
    assert!(before.contains("not a DeviceAllocator"), "{before}");
    // Without the NVIDIA driver, ensure_loaded has nothing to do and maps no CUDA library.
    if !driver_present() {
        ensure_loaded().unwrap();
        let still = cuda_peak_allocated(0).unwrap_err();
        assert!(still.contains("not a DeviceAllocator"), "{still}");
    }
    load_torch_cuda().unwrap();
    match cuda_peak_allocated(0) {
        Ok(_) => assert!(driver_present()),
        Err(e) => {
            assert!(
                !e.contains("not a DeviceAllocator") && !e.contains('\n'),
                "{e}"
            );
            eprintln!("after the load, without a GPU: {e}");
        }
    }
    assert_eq!(
        tch::Cuda::is_available(),
        driver_present() && tch::Cuda::device_count() > 0
    );
}
