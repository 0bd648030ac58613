//! This process's place in the job: its rank and the communicator of the trainer processes
//! (torch.distributed's process group). The launcher's [`ddetr_launcher::world::World`] is the
//! job's layout as the launcher resolves it; this is one trainer's view of it.

use ddetr_collective::{Communicator, TcpStoreServer};
use ddetr_launcher::bootstrap::Bootstrap;

use crate::device::pick_device;
use crate::TrainerError;

/// The communicator, and the bootstrap store server rank 0 hosts for the job's lifetime.
pub struct ProcessGroup {
    pub comm: Communicator,
    _server: Option<TcpStoreServer>,
}

impl ProcessGroup {
    /// From the launcher's environment (RANK, WORLD_SIZE, … and DDETR_RDZV with DDETR_JOB_TOKEN,
    /// or MASTER_ADDR/MASTER_PORT under plain torchrun; [`ddetr_launcher::bootstrap`]); a group
    /// of one without it. The backend follows the device ([`pick_device`]): NCCL on a GPU.
    pub fn from_env() -> Result<Self, TrainerError> {
        let boot = Bootstrap::from_env()?;
        // NCCL where the trainer runs on a GPU (torchrun's backend choice), the CPU collectives
        // elsewhere; CPU tensors in a NCCL job (loss sums, detections) go through staging copies.
        let comm = match &boot.store {
            None => Communicator::single(),
            Some(store) if pick_device(boot.info.local_rank)?.is_cuda() => {
                Communicator::nccl(store.as_ref(), boot.info, &boot.cfg)?
            }
            Some(store) => Communicator::cpu(store.as_ref(), boot.info, &boot.cfg)?,
        };
        // The bootstrap store (a rendezvous connection) is dropped here; a TCP store server stays.
        Ok(Self {
            comm,
            _server: boot.server,
        })
    }

    /// One process alone.
    pub fn single() -> Self {
        Self {
            comm: Communicator::single(),
            _server: None,
        }
    }
}
