# Copy of shared/peers/gloo_allreduce.py, embedded in `ddetr bench collective` as its gloo peer.
"""Peer figure: torch.distributed (gloo) allreduce bandwidth between processes
on this machine, reported like nccl-tests (algbw = bytes/time, busbw = algbw*2(n-1)/n).
Usage: python gloo_allreduce.py [world_size] [MiB ...]"""
import os, sys, time
import torch, torch.distributed as dist
import torch.multiprocessing as mp

def run(rank, world, sizes, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"; os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mib in sizes:
        n = mib * 1024 * 1024 // 4
        t = torch.ones(n)
        for _ in range(2): dist.all_reduce(t)
        dist.barrier()
        iters = max(3, min(50, 512 // max(mib, 1)))
        t0 = time.perf_counter()
        for _ in range(iters): dist.all_reduce(t)
        dist.barrier()
        dt = (time.perf_counter() - t0) / iters
        if rank == 0:
            algbw = mib * 1048576 / dt / 1e9
            print(f"gloo world={world} size={mib}MiB time={dt*1e3:.2f}ms algbw={algbw:.2f}GB/s busbw={algbw*2*(world-1)/world:.2f}GB/s", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    sizes = [int(s) for s in sys.argv[2:]] or [1, 16, 64, 256]
    mp.spawn(run, args=(world, sizes, 29611), nprocs=world)
