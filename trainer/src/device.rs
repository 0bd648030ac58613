//! Which device a task runs on, and the CPU threads each rank takes.

use tch::Device;

use crate::TrainerError;

/// `DDETR_DEVICE` (`cpu`, `cuda`, `auto`; ddetr-launch's `--device`), by default the rank's local
/// GPU when CUDA is available, else the CPU.
pub fn pick_device(local_rank: usize) -> Result<Device, TrainerError> {
    let want = std::env::var("DDETR_DEVICE").unwrap_or_else(|_| "auto".into());
    let cuda = crate::cuda_runtime::cuda_available();
    let gpu = || Device::Cuda(local_rank % tch::Cuda::device_count().max(1) as usize);
    match want.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" if cuda => Ok(gpu()),
        "cuda" => Err(TrainerError::Config(
            "DDETR_DEVICE=cuda but no CUDA GPU is visible to libtorch: run on a GPU machine or set DDETR_DEVICE=cpu".into(),
        )),
        "auto" | "" => Ok(if cuda { gpu() } else { Device::Cpu }),
        other => Err(TrainerError::Config(format!(
            "DDETR_DEVICE={other:?} is not a device: use cpu, cuda or auto"
        ))),
    }
}

/// On the CPU, gives each of the node's `local_world` ranks an equal share of the cores.
pub fn share_cpu_threads(device: Device, local_world: usize) {
    if device == Device::Cpu {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tch::set_num_threads((cores / local_world.max(1)).max(1) as i32);
    }
}
