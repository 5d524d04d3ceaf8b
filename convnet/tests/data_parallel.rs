//! Data-parallel steps ([`DataParallel`]) on ranks that are threads of this process
//! ([`ThreadRanks`]), against one process taking the whole global batch: the averaged
//! gradients, synchronised batch norm, the idle rank of a short last batch, bucket order.
//! (The MPI communicator and the CLI under `mpirun` are tested in
//! `convnet-cli/tests/distributed.rs`.)

mod common;

use common::{assert_close, assert_tensor_close, Fixture, ATOL, RTOL};
use convnet::dist::{Communicator, DataParallel, DataParallelOptions, ThreadRanks};
use convnet::nn::{Mode, Model};
use convnet::optim::{Optimizer, Sgd, SgdConfig};
use convnet::{GradStore, Reduction, Rng, Tensor};
use std::sync::Arc;

/// Named tensors as plain values.
type Named = Vec<(String, Vec<f32>)>;
/// A step's outcome on one rank: gradients and running statistics.
type StepResult = (Named, Named);

/// A freshly initialised `arch` from seed 0. Initialisation draws from the process-wide
/// generator, so tests (which run in parallel) build their models one at a time.
fn fresh_model(arch: &str, shape: [usize; 3]) -> Model {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    convnet::manual_seed(0);
    convnet::models::build(arch, shape, 10).unwrap()
}

/// A global batch of `n` images and labels.
fn batch(n: usize, shape: [usize; 3], seed: u64) -> (Tensor, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let x = Tensor::randn([n, shape[0], shape[1], shape[2]], &mut rng);
    let y = (0..n).map(|_| rng.below(10) as usize).collect();
    (x, y)
}

/// Rows `range` of `x` and `y`.
fn rows(x: &Tensor, y: &[usize], range: std::ops::Range<usize>) -> (Tensor, Vec<usize>) {
    let per: usize = x.dims()[1..].iter().product();
    let data = x.to_vec()[range.start * per..range.end * per].to_vec();
    let mut dims = x.dims().to_vec();
    dims[0] = range.len();
    (Tensor::from_vec(data, dims).unwrap(), y[range].to_vec())
}

/// Rank `r`'s slice of `n` items over `ranks` (as the loader splits a global batch).
fn slice(n: usize, r: usize, ranks: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / ranks, n % ranks);
    let start = r * base + r.min(extra);
    start..start + base + usize::from(r < extra)
}

/// Gradients by parameter name.
fn named(model: &Model, grads: &GradStore) -> Named {
    model
        .named_parameters()
        .into_iter()
        .map(|(n, p)| (n, grads.get(&p).expect("every parameter").to_vec()))
        .collect()
}

/// Runs one data-parallel training step of `arch` on `ranks` thread ranks, each on its
/// slice of the global batch, and returns every rank's averaged gradients, the running
/// statistics after the step, and the loss each rank computed.
fn parallel_step(
    arch: &str,
    x: &Tensor,
    y: &[usize],
    ranks: usize,
    opts: DataParallelOptions,
) -> Vec<StepResult> {
    let shape = [x.dims()[1], x.dims()[2], x.dims()[3]];
    let models: Vec<Model> = (0..ranks).map(|_| fresh_model(arch, shape)).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadRanks::group(ranks)
            .into_iter()
            .zip(models)
            .map(|(comm, model)| {
                s.spawn(move || {
                    let r = comm.rank();
                    let comm: Arc<dyn Communicator> = Arc::new(comm);
                    let mut dp = DataParallel::new(comm, &model, opts).unwrap();
                    let n = y.len();
                    let part = slice(n, r, ranks);
                    let loss = if part.is_empty() {
                        dp.idle_loss(&model).unwrap()
                    } else {
                        let (xs, ys) = rows(x, y, part);
                        let divisor = n as f32 / ranks as f32;
                        dp.forward(&model, &xs, Mode::Train)
                            .unwrap()
                            .cross_entropy(&ys, Reduction::Divided(divisor), 0.0)
                            .unwrap()
                    };
                    let grads = dp.backward(&loss).unwrap();
                    let buffers = model
                        .state_dict()
                        .into_iter()
                        .filter(|(n, _)| n.contains("running_"))
                        .map(|(n, t)| (n, t.to_vec()))
                        .collect();
                    (named(&model, &grads), buffers)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One process on the whole batch: gradients and running statistics.
fn whole_step(arch: &str, x: &Tensor, y: &[usize]) -> StepResult {
    let model = fresh_model(arch, [x.dims()[1], x.dims()[2], x.dims()[3]]);
    let loss = model
        .forward(x, Mode::Train)
        .unwrap()
        .cross_entropy(y, Reduction::Mean, 0.0)
        .unwrap();
    let grads = loss.backward().unwrap();
    let buffers = model
        .state_dict()
        .into_iter()
        .filter(|(n, _)| n.contains("running_"))
        .map(|(n, t)| (n, t.to_vec()))
        .collect();
    (named(&model, &grads), buffers)
}

/// Compares named tensors with a tolerance scaled to each tensor's largest magnitude.
fn assert_all_close(what: &str, actual: &Named, expected: &Named) {
    assert_eq!(actual.len(), expected.len(), "{what}: tensor count");
    for ((name, a), (ename, e)) in actual.iter().zip(expected) {
        assert_eq!(name, ename);
        let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_close(
            &format!("{what} {name}"),
            a,
            e,
            RTOL,
            ATOL.max(RTOL * scale),
        );
    }
}

/// Every rank got bit-identical gradients and buffers.
fn assert_ranks_agree(results: &[StepResult]) {
    for (r, res) in results.iter().enumerate().skip(1) {
        assert!(
            res == &results[0],
            "rank {r}'s gradients or buffers differ from rank 0's"
        );
    }
}

/// Without batch norm, the averaged gradients of 2 and 3 ranks (3: slices of 16, 16, 16
/// and of 7, 7, 6) are the gradients of the whole batch's mean.
#[test]
fn averaged_gradients_equal_the_whole_batch() {
    for (ranks, n) in [(2, 32), (3, 48), (3, 20)] {
        let (x, y) = batch(n, [3, 32, 32], 7);
        let expected = whole_step("seed-cnn", &x, &y);
        for overlap in [true, false] {
            let opts = DataParallelOptions {
                overlap,
                first_bucket_bytes: 64 << 10,
                bucket_bytes: 256 << 10,
                ..Default::default()
            };
            let got = parallel_step("seed-cnn", &x, &y, ranks, opts);
            assert_ranks_agree(&got);
            assert_all_close(
                &format!("{ranks} ranks, batch {n}, overlap {overlap}"),
                &got[0].0,
                &expected.0,
            );
        }
    }
}

/// A rank whose slice is empty (a global batch of 2 over 3 ranks) takes part without
/// changing the result.
#[test]
fn an_idle_rank_contributes_nothing() {
    let (x, y) = batch(2, [3, 32, 32], 9);
    let expected = whole_step("seed-cnn", &x, &y);
    let got = parallel_step("seed-cnn", &x, &y, 3, DataParallelOptions::default());
    assert_ranks_agree(&got);
    assert_all_close("idle rank", &got[0].0, &expected.0);
}

/// Synchronised batch norm: gradients and running statistics of the whole batch, on every
/// rank, for equal and unequal slices, and with an idle rank.
#[test]
fn synchronised_batch_norm_equals_the_whole_batch() {
    let opts = DataParallelOptions {
        sync_batch_norm: true,
        ..Default::default()
    };
    for (ranks, n) in [(2, 16), (3, 10), (3, 2)] {
        let (x, y) = batch(n, [3, 16, 16], 11);
        let expected = whole_step("resnet20", &x, &y);
        let got = parallel_step("resnet20", &x, &y, ranks, opts);
        assert_ranks_agree(&got);
        let what = format!("sync-bn {ranks} ranks, batch {n}");
        assert_all_close(&format!("{what} gradients"), &got[0].0, &expected.0);
        assert_all_close(
            &format!("{what} running statistics"),
            &got[0].1,
            &expected.1,
        );
    }
}

/// Per-rank batch norm (DDP's default): the averaged gradient is the mean of each slice's
/// own gradient, and every rank starts from rank 0's running statistics.
#[test]
fn per_rank_batch_norm_averages_each_slices_gradient() {
    let (x, y) = batch(16, [3, 16, 16], 13);
    let halves: Vec<_> = (0..2)
        .map(|r| {
            let (xs, ys) = rows(&x, &y, slice(16, r, 2));
            whole_step("resnet20", &xs, &ys).0
        })
        .collect();
    let expected: Named = halves[0]
        .iter()
        .zip(&halves[1])
        .map(|((n, a), (_, b))| {
            (
                n.clone(),
                a.iter().zip(b).map(|(a, b)| a / 2.0 + b / 2.0).collect(),
            )
        })
        .collect();
    let got = parallel_step("resnet20", &x, &y, 2, DataParallelOptions::default());
    assert_eq!(got[0].0, got[1].0, "ranks' gradients differ");
    assert_all_close("per-rank BN", &got[0].0, &expected);
}

/// Trains resnet20 as the `ddp.safetensors` case does, as one rank of `comm`: this rank's
/// loss of every step, and the final state dict.
fn train_like_fixture(
    case: &str,
    comm: Arc<dyn Communicator>,
) -> (Vec<f32>, Vec<(String, Tensor)>) {
    let fx = Fixture::load("ddp.safetensors");
    let s = fx.settings(case);
    let (steps, global) = (
        s["steps"].as_u64().unwrap() as usize,
        s["batch"].as_u64().unwrap() as usize,
    );
    assert_eq!(
        comm.size(),
        s["ranks"].as_u64().unwrap() as usize,
        "{case}: rank count"
    );
    // Built like the others, under the lock: its draws would otherwise land between another
    // test's seeding and its build (the fixture replaces these weights anyway).
    let model = fresh_model("resnet20", [3, 16, 16]);
    let init = fx.state_with_prefix(case, "init.");
    model.load_state_dict(&init, false).unwrap();
    let opts = DataParallelOptions {
        sync_batch_norm: case == "sync_bn",
        ..Default::default()
    };
    let mut dp = DataParallel::new(comm.clone(), &model, opts).unwrap();
    let mut opt = Sgd::new(
        model.named_parameters(),
        SgdConfig {
            lr: s["lr"].as_f64().unwrap(),
            momentum: s["momentum"].as_f64().unwrap(),
            weight_decay: s["weight_decay"].as_f64().unwrap(),
            nesterov: s["nesterov"].as_bool().unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    let (xs, ts) = (fx.tensor(case, "x").to_vec(), fx.tensor(case, "t").to_vec());
    let per = 3 * 16 * 16;
    let part = slice(global, comm.rank(), comm.size());
    let mut losses = Vec::new();
    for step in 0..steps {
        let first = step * global + part.start;
        let x = Tensor::from_vec(
            xs[first * per..(first + part.len()) * per].to_vec(),
            [part.len(), 3, 16, 16],
        )
        .unwrap();
        let t: Vec<usize> = ts[first..first + part.len()]
            .iter()
            .map(|&v| v as usize)
            .collect();
        let loss = dp
            .forward(&model, &x, Mode::Train)
            .unwrap()
            .cross_entropy(&t, Reduction::Mean, 0.0)
            .unwrap();
        losses.push(loss.item().unwrap());
        let grads = dp.backward(&loss).unwrap();
        opt.step(&grads).unwrap();
    }
    (losses, model.state_dict())
}

/// Rank `rank`'s figures against the fixture's: its losses, and for rank 0 the final state.
fn check_against_fixture(case: &str, rank: usize, losses: &[f32], state: &[(String, Tensor)]) {
    let fx = Fixture::load("ddp.safetensors");
    let expected = fx.tensor(case, "losses").to_vec();
    let ranks = fx.tensor(case, "losses").dims()[1];
    let mine: Vec<f32> = expected.iter().skip(rank).step_by(ranks).copied().collect();
    assert_close(
        &format!("{case} rank {rank} losses"),
        losses,
        &mine,
        RTOL,
        ATOL,
    );
    if rank != 0 {
        // Rank 1's running statistics (rank 0's broadcast before each step, then its own
        // slice's; with SyncBN the global batch's).
        for (name, t) in state {
            if let Some(e) = fx.try_tensor(case, &format!("rank1.{name}")) {
                assert_tensor_close(&format!("{case} rank {rank} {name}"), t, &e, RTOL, ATOL);
            }
        }
        return;
    }
    for (name, t) in state {
        match fx.try_tensor(case, &format!("final.{name}")) {
            Some(e) => assert_tensor_close(&format!("{case} {name}"), t, &e, RTOL, ATOL),
            None => panic!("{case}: no reference for {name}"),
        }
    }
}

/// Two ranks against PyTorch: DistributedDataParallel's per-rank batch norm with
/// `broadcast_buffers`, and SyncBatchNorm (the whole batch's statistics), six SGD steps of
/// resnet20 (three with SyncBN: its fourth step's gradient is tipped by the kernels'
/// summation order, see `tools/fixtures/ddp.py`; float64 reference).
#[test]
fn two_ranks_train_resnet20_like_pytorch_ddp() {
    for case in ["per_rank_bn", "sync_bn"] {
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = ThreadRanks::group(2)
                .into_iter()
                .map(|comm| s.spawn(move || train_like_fixture(case, Arc::new(comm))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (losses, state)) in results.iter().enumerate() {
            check_against_fixture(case, rank, losses, state);
        }
    }
}

/// The same run on two MPI processes: the test binary starts itself under `mpirun`
/// (`CONVNET_MPIRUN` overrides the launcher command, default `mpirun --oversubscribe`).
#[cfg(feature = "mpi")]
#[test]
fn two_mpi_ranks_train_resnet20_like_pytorch_ddp() {
    const RANK_ENV: &str = "CONVNET_TEST_AS_MPI_RANK";
    if std::env::var_os(RANK_ENV).is_some() {
        let comm = convnet::dist::mpi::MpiCommunicator::init().unwrap();
        for case in ["per_rank_bn", "sync_bn"] {
            let (losses, state) = train_like_fixture(case, comm.clone());
            check_against_fixture(case, comm.rank(), &losses, &state);
        }
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let status = common::mpirun(2)
        .arg(exe)
        .args([
            "--exact",
            "two_mpi_ranks_train_resnet20_like_pytorch_ddp",
            "--test-threads",
            "1",
        ])
        .env(RANK_ENV, "1")
        .status()
        .expect("mpirun runs (install an MPI library: apt install openmpi-bin)");
    assert!(status.success(), "a rank failed: {status}");
}
