//! Counting CUDA GPUs without linking CUDA: `libcuda.so.1` (the driver, present wherever a GPU is)
//! is opened at run time and asked `cuInit(0)` + `cuDeviceGetCount`, which honour
//! `CUDA_VISIBLE_DEVICES`. A machine without the driver simply has no GPU.

use std::ffi::c_int;

/// What the driver said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuProbe {
    /// The driver answered with this many visible devices (0 is possible: CUDA_ERROR_NO_DEVICE).
    Devices(usize),
    /// No usable driver: why, in a few words.
    Unavailable(String),
}

impl GpuProbe {
    /// Visible GPUs (0 when the driver is missing).
    pub fn count(&self) -> usize {
        match self {
            GpuProbe::Devices(n) => *n,
            GpuProbe::Unavailable(_) => 0,
        }
    }

    /// Why there is no GPU, for messages ("libcuda.so.1 not found", "the driver reports no device").
    pub fn reason(&self) -> String {
        match self {
            GpuProbe::Devices(0) => {
                "the CUDA driver reports no device (check CUDA_VISIBLE_DEVICES)".into()
            }
            GpuProbe::Devices(n) => format!("{n} CUDA device(s) visible"),
            GpuProbe::Unavailable(why) => why.clone(),
        }
    }
}

/// `CUDA_ERROR_NO_DEVICE`: cuInit's answer on a machine with a driver but no visible GPU.
const CUDA_ERROR_NO_DEVICE: c_int = 100;

/// Opens the driver and counts the devices it shows this process.
pub fn probe() -> GpuProbe {
    type CuInit = unsafe extern "C" fn(flags: u32) -> c_int;
    type CuDeviceGetCount = unsafe extern "C" fn(count: *mut c_int) -> c_int;
    // SAFETY: loading the NVIDIA driver runs only its library initialisers.
    let lib = match unsafe { libloading::Library::new("libcuda.so.1") } {
        Ok(lib) => lib,
        Err(_) => return GpuProbe::Unavailable("no NVIDIA driver (libcuda.so.1 not found)".into()),
    };
    // SAFETY: the symbol types are those of the CUDA driver API (cuda.h).
    let (init, count) = unsafe {
        match (
            lib.get::<CuInit>(b"cuInit\0"),
            lib.get::<CuDeviceGetCount>(b"cuDeviceGetCount\0"),
        ) {
            (Ok(i), Ok(c)) => (i, c),
            _ => return GpuProbe::Unavailable("libcuda.so.1 lacks cuInit/cuDeviceGetCount".into()),
        }
    };
    // SAFETY: cuInit takes flags 0; cuDeviceGetCount writes one int.
    let rc = unsafe { init(0) };
    if rc == CUDA_ERROR_NO_DEVICE {
        return GpuProbe::Devices(0);
    }
    if rc != 0 {
        return GpuProbe::Unavailable(format!("cuInit failed with CUDA error {rc}"));
    }
    let mut n: c_int = 0;
    let rc = unsafe { count(&mut n) };
    if rc != 0 {
        return GpuProbe::Unavailable(format!("cuDeviceGetCount failed with CUDA error {rc}"));
    }
    tracing::debug!(devices = n, "CUDA driver probed");
    GpuProbe::Devices(n.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_agrees_with_the_driver_library_being_present() {
        // SAFETY: as in `probe`.
        let driver = unsafe { libloading::Library::new("libcuda.so.1") }.is_ok();
        let p = probe();
        if !driver {
            assert_eq!(
                p,
                GpuProbe::Unavailable("no NVIDIA driver (libcuda.so.1 not found)".into())
            );
            assert_eq!(p.count(), 0);
        } else {
            assert!(!matches!(&p, GpuProbe::Unavailable(w) if w.contains("not found")));
        }
    }
}
