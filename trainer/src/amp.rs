//! Mixed precision (`train.precision` fp16 / bf16): libtorch's autocast around forward and loss,
//! and fp16's dynamic loss scaling (torch.amp.GradScaler's rule).
//!
//! tch exposes only the deprecated CUDA-only `at::autocast::set_enabled`, which cannot choose
//! bf16, so the guard calls libtorch's per-device API (`at::autocast::set_autocast_enabled`,
//! `set_autocast_dtype`, `ATen/autocast_mode.h`) through its C++ symbols; `c10::DeviceType`
//! and `c10::ScalarType` are `int8_t` enums, passed by value like an `i8`.

use tch::{Device, Kind};

use crate::spec::Precision;

#[allow(improper_ctypes)]
mod ffi {
    extern "C" {
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device_type: i8) -> bool;
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device_type: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device_type: i8) -> i8;
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device_type: i8, dtype: i8);
    }
}

/// `c10::DeviceType` codes.
const DEVICE_CPU: i8 = 0;
const DEVICE_CUDA: i8 = 1;

fn scalar_type(kind: Kind) -> i8 {
    match kind {
        Kind::Half => 5,
        Kind::BFloat16 => 15,
        _ => 6, // Float
    }
}

/// Autocast to `kind` for `device`'s device type while alive; restores the previous state.
pub struct AutocastGuard {
    device_type: i8,
    prev_enabled: bool,
    prev_dtype: i8,
}

impl AutocastGuard {
    pub fn new(device: Device, kind: Kind) -> Self {
        let device_type = match device {
            Device::Cuda(_) => DEVICE_CUDA,
            _ => DEVICE_CPU,
        };
        // SAFETY: plain setters/getters of libtorch's thread-local autocast state; the enum
        // arguments are valid c10::DeviceType / c10::ScalarType values.
        unsafe {
            let prev_enabled = ffi::is_autocast_enabled(device_type);
            let prev_dtype = ffi::get_autocast_dtype(device_type);
            ffi::set_autocast_enabled(device_type, true);
            ffi::set_autocast_dtype(device_type, scalar_type(kind));
            torch_sys::at_autocast_increment_nesting();
            Self {
                device_type,
                prev_enabled,
                prev_dtype,
            }
        }
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe {
            if torch_sys::at_autocast_decrement_nesting() == 0 {
                torch_sys::at_autocast_clear_cache();
            }
            ffi::set_autocast_enabled(self.device_type, self.prev_enabled);
            ffi::set_autocast_dtype(self.device_type, self.prev_dtype);
        }
    }
}

/// Whether autocast is on for `device`'s type now.
pub fn autocast_enabled(device: Device) -> bool {
    let t = if device.is_cuda() {
        DEVICE_CUDA
    } else {
        DEVICE_CPU
    };
    // SAFETY: a getter of thread-local state.
    unsafe { ffi::is_autocast_enabled(t) }
}

/// Dynamic loss scaling, torch.amp.GradScaler's defaults and rule: start at 2¹⁶; a step whose
/// gradients are not finite is skipped and halves the scale; 2000 finite steps in a row double it.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_tracker: u32,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_tracker: 0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl LossScaler {
    /// After a step: `skipped` when its gradients were not finite.
    pub fn update(&mut self, skipped: bool) {
        if skipped {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        }
    }
}

/// The precision mode of a run: autocast dtype and, for fp16, the loss scaler.
#[derive(Debug, Clone)]
pub struct Amp {
    pub device: Device,
    /// None: fp32 (no autocast).
    pub kind: Option<Kind>,
    pub scaler: Option<LossScaler>,
}

impl Amp {
    /// The mode for `precision` on `device` (the caller has refused fp16/bf16 on a CPU run).
    pub fn new(precision: Precision, device: Device) -> Self {
        let (kind, scaler) = match precision {
            Precision::Fp32 => (None, None),
            Precision::Fp16 => (Some(Kind::Half), Some(LossScaler::default())),
            Precision::Bf16 => (Some(Kind::BFloat16), None),
        };
        Self {
            device,
            kind,
            scaler,
        }
    }

    /// Runs `f` under autocast (or plainly for fp32).
    pub fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        match self.kind {
            Some(k) => {
                let _g = AutocastGuard::new(self.device, k);
                f()
            }
            None => f(),
        }
    }

    /// The factor the loss is multiplied by before backward.
    pub fn loss_scale(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, |s| s.scale)
    }

    /// After an engine step.
    pub fn update(&mut self, skipped: bool) {
        if let Some(s) = &mut self.scaler {
            s.update(skipped);
        }
    }

    /// The scaler's state for a checkpoint (`amp.scale`, `amp.growth_tracker`).
    pub fn state_tensors(&self) -> Vec<(String, tch::Tensor)> {
        match &self.scaler {
            Some(s) => vec![
                ("amp.scale".into(), tch::Tensor::from_slice(&[s.scale])),
                (
                    "amp.growth_tracker".into(),
                    tch::Tensor::from_slice(&[i64::from(s.growth_tracker)]),
                ),
            ],
            None => Vec::new(),
        }
    }

    /// Restores what [`Amp::state_tensors`] saved (absent: a fresh scaler).
    pub fn load_state(&mut self, saved: &std::collections::BTreeMap<String, tch::Tensor>) {
        if let Some(s) = &mut self.scaler {
            if let Some(t) = saved.get("amp.scale") {
                s.scale = t.double_value(&[0]);
            }
            if let Some(t) = saved.get("amp.growth_tracker") {
                s.growth_tracker = t.int64_value(&[0]) as u32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn the_guard_turns_cpu_autocast_on_to_the_dtype_and_restores_it() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        assert!(!autocast_enabled(Device::Cpu));
        {
            let _g = AutocastGuard::new(Device::Cpu, Kind::BFloat16);
            assert!(autocast_enabled(Device::Cpu));
            assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
            {
                let _inner = AutocastGuard::new(Device::Cpu, Kind::BFloat16);
                assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
            }
            assert!(
                autocast_enabled(Device::Cpu),
                "inner guard restored the outer state"
            );
        }
        assert!(!autocast_enabled(Device::Cpu));
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }

    #[test]
    fn the_scaler_follows_torchs_grad_scaler_rule() {
        let mut s = LossScaler {
            growth_interval: 3,
            ..LossScaler::default()
        };
        s.update(true);
        assert_eq!((s.scale, s.growth_tracker), (32768.0, 0));
        s.update(false);
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (32768.0, 2));
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
        s.update(false);
        s.update(true);
        assert_eq!((s.scale, s.growth_tracker), (32768.0, 0));
    }

    #[test]
    fn amp_state_round_trips_through_named_tensors() {
        let mut a = Amp::new(Precision::Fp16, Device::Cpu);
        a.update(true);
        a.update(false);
        let saved: std::collections::BTreeMap<_, _> = a.state_tensors().into_iter().collect();
        let mut b = Amp::new(Precision::Fp16, Device::Cpu);
        b.load_state(&saved);
        assert_eq!(a.scaler, b.scaler);
        assert!(Amp::new(Precision::Bf16, Device::Cpu)
            .state_tensors()
            .is_empty());
    }
}
