//! [`ThreadRanks`]: ranks that are threads of one process, exchanging data through shared
//! memory — the same [`Communicator`] contract as MPI, for tests of data-parallel code
//! (every collective is checked to be called in the same order by all ranks) and for trying
//! it out without an MPI installation. Sums are taken in rank order, so every rank gets the
//! same bits.

use super::{Channel, Communicator, PendingReduce};
use crate::error::{invalid, Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What one collective operation collects from the ranks.
struct Slot {
    /// The operation's kind, to catch ranks calling different collectives.
    kind: &'static str,
    parts: Vec<Option<Vec<f64>>>,
    /// Ranks that have read the result.
    taken: usize,
}

#[derive(Default)]
struct Shared {
    slots: HashMap<(Channel, u64), Slot>,
    /// The next sequence number of each (rank, channel).
    next: HashMap<(usize, Channel), u64>,
    /// A rank gave up (dropped or aborted): the others stop waiting.
    broken: Option<String>,
}

struct Group {
    size: usize,
    state: Mutex<Shared>,
    changed: Condvar,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One rank of a group of threads; make the group with [`ThreadRanks::group`] and move one
/// member into each thread.
///
/// ```
/// use convnet::dist::{Channel, Communicator, ThreadRanks};
/// let sums: Vec<f64> = std::thread::scope(|s| {
///     let handles: Vec<_> = ThreadRanks::group(3)
///         .into_iter()
///         .map(|rank| s.spawn(move || {
///             let mut v = [rank.rank() as f64 + 1.0];
///             rank.all_reduce_sum(Channel::Main, &mut v).map(|()| v[0])
///         }))
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
/// });
/// assert_eq!(sums, vec![6.0, 6.0, 6.0]);
/// ```
pub struct ThreadRanks {
    rank: usize,
    group: Arc<Group>,
}

impl ThreadRanks {
    /// `size` ranks sharing one group.
    pub fn group(size: usize) -> Vec<ThreadRanks> {
        let group = Arc::new(Group {
            size,
            state: Mutex::new(Shared::default()),
            changed: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadRanks {
                rank,
                group: group.clone(),
            })
            .collect()
    }

    /// Deposits this rank's part of the next `kind` operation on `channel`; returns its key.
    fn deposit(
        &self,
        channel: Channel,
        kind: &'static str,
        part: Vec<f64>,
    ) -> Result<(Channel, u64)> {
        let mut st = self.group.lock();
        let seq = {
            let next = st.next.entry((self.rank, channel)).or_insert(0);
            *next += 1;
            *next - 1
        };
        let size = self.group.size;
        let slot = st.slots.entry((channel, seq)).or_insert_with(|| Slot {
            kind,
            parts: vec![None; size],
            taken: 0,
        });
        if slot.kind != kind {
            let msg = format!(
                "rank {} called {kind} as operation {seq} on {channel:?}, another rank called {}",
                self.rank, slot.kind
            );
            st.broken = Some(msg.clone());
            self.group.changed.notify_all();
            return Err(invalid("ThreadRanks", msg));
        }
        slot.parts[self.rank] = Some(part);
        self.group.changed.notify_all();
        Ok((channel, seq))
    }

    /// Whether every rank has deposited its part of operation `key`.
    fn complete(&self, key: (Channel, u64)) -> bool {
        let st = self.group.lock();
        st.slots
            .get(&key)
            .is_some_and(|s| s.parts.iter().all(Option::is_some))
    }

    /// Waits for every rank's part of operation `key` and returns all parts in rank order.
    fn collect(&self, key: (Channel, u64)) -> Result<Vec<Vec<f64>>> {
        let mut st = self.group.lock();
        loop {
            if let Some(msg) = &st.broken {
                return Err(Error::Unsupported(format!("thread ranks: {msg}")));
            }
            let slot = st.slots.get(&key).expect("deposited before collecting");
            if slot.parts.iter().all(Option::is_some) {
                break;
            }
            st = self
                .group
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        let slot = st.slots.get_mut(&key).expect("present");
        let parts: Vec<Vec<f64>> = slot.parts.iter().flatten().cloned().collect();
        slot.taken += 1;
        if slot.taken == self.group.size {
            st.slots.remove(&key);
        }
        Ok(parts)
    }

    fn exchange(
        &self,
        channel: Channel,
        kind: &'static str,
        part: Vec<f64>,
    ) -> Result<Vec<Vec<f64>>> {
        let key = self.deposit(channel, kind, part)?;
        let parts = self.collect(key)?;
        if parts.iter().any(|p| p.len() != parts[0].len()) && kind != "broadcast" {
            return Err(invalid(
                "ThreadRanks",
                format!("ranks gave {kind} buffers of different lengths"),
            ));
        }
        Ok(parts)
    }
}

impl Drop for ThreadRanks {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut st = self.group.lock();
            st.broken = Some(format!("rank {} panicked", self.rank));
            self.group.changed.notify_all();
        }
    }
}

/// Element-wise sum of the parts, in rank order.
fn sum_parts(parts: &[Vec<f64>]) -> Vec<f64> {
    let mut out = parts[0].clone();
    for p in &parts[1..] {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

struct ThreadPending {
    ranks: ThreadRanks,
    key: (Channel, u64),
    send: Vec<f32>,
    recv: Vec<f32>,
}

impl PendingReduce for ThreadPending {
    fn test(&mut self) -> Result<bool> {
        Ok(self.ranks.complete(self.key))
    }

    fn wait(mut self: Box<Self>) -> Result<(Vec<f32>, Vec<f32>)> {
        let parts = self.ranks.collect(self.key)?;
        // float32 sums in rank order, as an MPI library sums MPI_FLOAT.
        for (i, r) in self.recv.iter_mut().enumerate() {
            *r = parts.iter().fold(0f32, |acc, p| acc + p[i] as f32);
        }
        Ok((
            std::mem::take(&mut self.send),
            std::mem::take(&mut self.recv),
        ))
    }
}

impl Communicator for ThreadRanks {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.group.size
    }
    fn local_rank(&self) -> usize {
        self.rank
    }
    fn local_size(&self) -> usize {
        self.group.size
    }
    fn description(&self) -> String {
        "threads of one process".into()
    }
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        let mine = data.iter().map(|&v| v as f64).collect();
        let parts = self.exchange(Channel::Main, "broadcast", mine)?;
        let from = parts
            .get(root)
            .ok_or_else(|| invalid("broadcast", "no such root"))?;
        if from.len() != data.len() {
            return Err(invalid(
                "broadcast",
                "ranks gave buffers of different lengths",
            ));
        }
        for (d, v) in data.iter_mut().zip(from) {
            *d = *v as f32;
        }
        Ok(())
    }
    fn broadcast_bytes(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        let mine = data.iter().map(|&v| v as f64).collect();
        let parts = self.exchange(Channel::Main, "broadcast", mine)?;
        let from = parts
            .get(root)
            .ok_or_else(|| invalid("broadcast", "no such root"))?;
        *data = from.iter().map(|&v| v as u8).collect();
        Ok(())
    }
    fn all_reduce_sum(&self, channel: Channel, data: &mut [f64]) -> Result<()> {
        let parts = self.exchange(channel, "all_reduce_sum", data.to_vec())?;
        data.copy_from_slice(&sum_parts(&parts));
        Ok(())
    }
    fn all_reduce_max(&self, data: &mut [f64]) -> Result<()> {
        let parts = self.exchange(Channel::Main, "all_reduce_max", data.to_vec())?;
        for (i, d) in data.iter_mut().enumerate() {
            *d = parts.iter().map(|p| p[i]).fold(f64::NEG_INFINITY, f64::max);
        }
        Ok(())
    }
    fn all_gather(&self, channel: Channel, local: &[f64]) -> Result<Vec<f64>> {
        Ok(self
            .exchange(channel, "all_gather", local.to_vec())?
            .concat())
    }
    fn start_all_reduce(&self, send: Vec<f32>, recv: Vec<f32>) -> Result<Box<dyn PendingReduce>> {
        if send.len() != recv.len() {
            return Err(invalid("all_reduce", "send and receive lengths differ"));
        }
        let key = self.deposit(
            Channel::Gradients,
            "all_reduce",
            send.iter().map(|&v| v as f64).collect(),
        )?;
        Ok(Box::new(ThreadPending {
            ranks: ThreadRanks {
                rank: self.rank,
                group: self.group.clone(),
            },
            key,
            send,
            recv,
        }))
    }
    fn abort(&self, message: &str, code: i32) -> ! {
        eprintln!("{message}");
        std::process::exit(code)
    }
}
