//! The DDP engine in real processes: N ranks × batch G/N equal one process with batch G after
//! several AdamW steps (libtorch's AdamW and clip_grad_norm as the reference; the model, data and
//! tolerance are in `common/reference.rs`). The trainer's engines built on it (`ddp`, and `fsdp`,
//! ZeRO-2) are tested the same way in `trainer/tests/engines.rs`.

mod common;

use std::time::Duration;

use common::reference::{
    adamw, assert_close, assert_norm, loss, model, params, rank_env, reference, MAX_NORM,
};
use common::{child_comm, launch_ok, scenario};
use ddetr_collective::ddp::{BucketConfig, Ddp};
use ddetr_collective::Communicator;
use tch::Tensor;

fn train_ddp(comm: &Communicator, steps: i64) -> Vec<Tensor> {
    let m = model(comm.rank() as i64);
    let ps = params(&m);
    let ddp = Ddp::new(
        comm,
        &ps,
        &[m.buffer.shallow_clone()],
        BucketConfig {
            first_bucket_bytes: 256,
            bucket_cap_bytes: 512,
        },
    )
    .unwrap();
    assert!(ddp.buckets().len() >= 3, "the test wants several buckets");
    assert!(
        m.buffer.equal(&model(0).buffer),
        "buffer not broadcast from rank 0"
    );
    let mut opt = adamw(&m);
    for s in 0..steps {
        opt.zero_grad();
        loss(&m, s, comm.rank(), comm.world()).backward();
        ddp.sync_gradients(&ps).unwrap();
        let norm = ddp.clip_grad_norm(&ps, MAX_NORM);
        if s == 0 {
            assert_norm("ddp", norm);
        }
        opt.step();
    }
    ps
}

fn run_ddp() {
    let comm = child_comm();
    let got = train_ddp(&comm, 4);
    assert_close("ddp", &got, &reference(0..4));
}

#[test]
#[ignore = "entry point of the ranks the other tests spawn"]
fn child() {
    match scenario().as_str() {
        "ddp" => run_ddp(),
        other => panic!("unknown scenario {other}"),
    }
}

#[test]
fn ddp_over_n_ranks_equals_one_process_with_the_whole_batch() {
    for world in [1, 2, 3, 4] {
        launch_ok(
            "engines",
            "ddp",
            world,
            &rank_env(),
            Duration::from_secs(60),
        );
    }
}
