//! Time of the gradient all-reduce alone (`Communicator::start_all_reduce` + wait) for
//! buffer sizes from 4 KiB to 64 MiB, on the ranks `mpirun` starts: the latency and
//! per-byte figures of the cost model in docs/distributed.md.
//!
//! ```text
//! cargo build --release -p convnet --features mpi --example allreduce
//! mpirun -np 2 target/release/examples/allreduce
//! mpirun -np 2 --mca btl tcp,self target/release/examples/allreduce
//! ```

use convnet::dist::mpi::MpiCommunicator;
use convnet::dist::{Channel, Communicator};
use std::time::Instant;

fn main() -> convnet::Result<()> {
    let comm = MpiCommunicator::init()?;
    if comm.rank() == 0 {
        println!(
            "{} ranks over {}; median of 30 all-reduces (float32 sum) per size",
            comm.size(),
            comm.description()
        );
        println!("{:>10} {:>12} {:>14}", "bytes", "ms", "algbw GB/s");
    }
    let mut bytes = 4 << 10;
    while bytes <= 64 << 20 {
        let n = bytes / 4;
        let (mut send, mut recv) = (vec![1f32; n], vec![0f32; n]);
        let mut times = Vec::new();
        for i in 0..35 {
            let mut sync = [0.0];
            comm.all_reduce_sum(Channel::Main, &mut sync)?;
            let t0 = Instant::now();
            (send, recv) = comm.start_all_reduce(send, recv)?.wait()?;
            if i >= 5 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let mut median = [times[times.len() / 2]];
        comm.all_reduce_max(&mut median)?;
        if comm.rank() == 0 {
            println!(
                "{bytes:>10} {:>12.4} {:>14.3}",
                median[0] * 1e3,
                bytes as f64 / median[0] / 1e9
            );
        }
        bytes *= 4;
    }
    Ok(())
}
