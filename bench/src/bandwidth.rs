//! Collective bandwidth for `ddetr bench collective`, measured the way nccl-tests reports it
//! (`doc/PERFORMANCE.md`): algbw = S / t with S the bytes of the whole operation (for all-gather
//! and reduce-scatter the gathered / scattered array, world × per-rank count), busbw = algbw ×
//! 2(n−1)/n for all-reduce and × (n−1)/n for all-gather and reduce-scatter. The time of an
//! iteration is the slowest rank's mean.

use std::time::Instant;

use ddetr_collective::{CollectiveError, Communicator, ReduceOp, Result};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchOp {
    AllReduce,
    AllGather,
    ReduceScatter,
}

impl std::str::FromStr for BenchOp {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "all_reduce" => Ok(BenchOp::AllReduce),
            "all_gather" => Ok(BenchOp::AllGather),
            "reduce_scatter" => Ok(BenchOp::ReduceScatter),
            other => Err(format!(
                "unknown op {other:?}: use all_reduce, all_gather or reduce_scatter"
            )),
        }
    }
}

impl BenchOp {
    pub fn name(self) -> &'static str {
        match self {
            BenchOp::AllReduce => "all_reduce",
            BenchOp::AllGather => "all_gather",
            BenchOp::ReduceScatter => "reduce_scatter",
        }
    }

    /// nccl-tests' bus-bandwidth factor for `n` ranks.
    pub fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            BenchOp::AllReduce => 2.0 * (n - 1.0) / n,
            BenchOp::AllGather | BenchOp::ReduceScatter => (n - 1.0) / n,
        }
    }
}

/// One size's result.
#[derive(Debug, Clone, Copy)]
pub struct Measurement {
    /// S: bytes of the whole operation.
    pub bytes: usize,
    pub iters: usize,
    pub time_s: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
}

/// Iterations for a size: as the gloo peer script does, so both sides average alike.
pub fn iterations(bytes: usize) -> usize {
    let mib = (bytes >> 20).max(1);
    (512 / mib).clamp(3, 50)
}

fn sync_device(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Measures `op` on f32 buffers of `bytes` (rounded down to a multiple of 4 × world) on `device`.
/// Collective: every rank calls it with the same arguments.
pub fn measure(
    comm: &Communicator,
    op: BenchOp,
    bytes: usize,
    device: Device,
) -> Result<Measurement> {
    let n = comm.world();
    let count = (bytes / 4 / n * n) as i64;
    if count == 0 {
        return Err(CollectiveError::InvalidArgument {
            op: "bench",
            what: format!("{bytes} bytes is too small for {n} ranks"),
        });
    }
    let opts = (Kind::Float, device);
    let per_rank = count / n as i64;
    let mut full = Tensor::ones([count], opts);
    let mut part = Tensor::ones([per_rank], opts);
    let mut run = || -> Result<()> {
        match op {
            BenchOp::AllReduce => comm.all_reduce(&mut full, ReduceOp::Sum),
            BenchOp::AllGather => comm.all_gather(&part, &mut full),
            BenchOp::ReduceScatter => comm.reduce_scatter(&full, &mut part, ReduceOp::Sum),
        }
    };
    for _ in 0..2 {
        run()?;
    }
    sync_device(device);
    comm.barrier()?;
    let iters = iterations(bytes);
    let start = Instant::now();
    for _ in 0..iters {
        run()?;
    }
    sync_device(device);
    let mine = start.elapsed().as_secs_f64() / iters as f64;
    let mut slowest = Tensor::from_slice(&[mine]).to_device(device);
    comm.all_reduce(&mut slowest, ReduceOp::Max)?;
    let time_s = slowest.double_value(&[0]);
    let s = count as f64 * 4.0;
    let algbw_gbps = s / time_s / 1e9;
    Ok(Measurement {
        bytes: count as usize * 4,
        iters,
        time_s,
        algbw_gbps,
        busbw_gbps: algbw_gbps * op.bus_factor(n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_factors_follow_nccl_tests() {
        assert_eq!(BenchOp::AllReduce.bus_factor(2), 1.0);
        assert_eq!(BenchOp::AllReduce.bus_factor(4), 1.5);
        assert_eq!(BenchOp::AllGather.bus_factor(4), 0.75);
        assert_eq!(BenchOp::ReduceScatter.bus_factor(2), 0.5);
        assert_eq!(iterations(64 << 20), 8);
        assert_eq!(iterations(256 << 20), 3);
        assert_eq!(iterations(1 << 20), 50);
    }

    #[test]
    fn measure_runs_in_a_world_of_one() {
        let comm = Communicator::single();
        let m = measure(&comm, BenchOp::AllReduce, 1 << 16, Device::Cpu).unwrap();
        assert_eq!(m.bytes, 1 << 16);
        assert!(m.time_s > 0.0 && m.busbw_gbps == 0.0);
    }
}
