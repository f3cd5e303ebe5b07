//! The ranks of a tensor-parallel engine past the first: one thread per rank, each holding its shard of
//! the model, its KV cache and its fixed-shape steps on its own device. The scheduler (rank 0's thread)
//! stays one: for every step it hands each rank a job that runs the same step on that rank's state,
//! runs its own part, then waits for every rank. The model's collectives (inside the parallel layers)
//! keep the ranks in lockstep; a collective whose peer never comes fails after the group's timeout, and a
//! rank that failed or panicked fails the step and then every later one, with the rank's error.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use mmreg_core::{Error, MultiModalModel, PagedKvCache, Result};
use tch::Device;

use crate::dist::ProcessGroup;
use crate::scheduler::panic_message;
use crate::step_graphs::FixedShapeSteps;

/// What a rank holds.
pub(crate) struct RankState {
    pub model: Box<dyn MultiModalModel>,
    pub cache: Option<PagedKvCache>,
    pub fixed: Option<FixedShapeSteps>,
    pub group: Arc<ProcessGroup>,
    pub device: Device,
}

pub(crate) type Job = Box<dyn FnOnce(&mut RankState) -> Result<()> + Send>;

struct Worker {
    rank: usize,
    device: Device,
    jobs: Option<Sender<Job>>,
    done: Receiver<Result<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Ranks `1..size` of the group, and rank 0's membership (its state lives in the scheduler).
pub(crate) struct Ranks {
    workers: Vec<Worker>,
    group: Arc<ProcessGroup>,
    /// Set once a rank has failed: the group is out of step, so every later step fails with it.
    broken: Option<String>,
}

impl Ranks {
    /// Starts a thread per rank `1..` that loads its model with `load(rank)` (all at once); the caller
    /// loads rank 0's meanwhile, then waits for the others with [`Ranks::finish`].
    pub(crate) fn spawn(
        groups: &[Arc<ProcessGroup>],
        devices: &[Device],
        load: impl Fn(usize) -> Result<Box<dyn MultiModalModel>> + Send + Sync + 'static,
    ) -> Result<Ranks> {
        let load = Arc::new(load);
        let mut workers = Vec::new();
        for (rank, (group, &device)) in groups.iter().zip(devices).enumerate().skip(1) {
            let (jobs_tx, jobs_rx) = channel::<Job>();
            let (done_tx, done_rx) = channel::<Result<()>>();
            let (load, group) = (load.clone(), group.clone());
            let thread = std::thread::Builder::new()
                .name(format!("mmreg-rank-{rank}"))
                .spawn(move || {
                    let _guard = tch::no_grad_guard();
                    let loaded =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(rank)))
                            .unwrap_or_else(|p| Err(Error::Engine(panic_message("loading", p))));
                    let mut state = match loaded {
                        Ok(model) => {
                            let _ = done_tx.send(Ok(()));
                            RankState {
                                model,
                                cache: None,
                                fixed: None,
                                group,
                                device,
                            }
                        }
                        Err(e) => {
                            let _ = done_tx.send(Err(e));
                            return;
                        }
                    };
                    for job in jobs_rx {
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            job(&mut state)
                        }))
                        .unwrap_or_else(|p| Err(Error::Engine(panic_message("the step", p))));
                        if done_tx.send(result).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Engine(format!("could not start rank {rank}: {e}")))?;
            workers.push(Worker {
                rank,
                device,
                jobs: Some(jobs_tx),
                done: done_rx,
                thread: Some(thread),
            });
        }
        Ok(Ranks {
            workers,
            group: groups[0].clone(),
            broken: None,
        })
    }

    /// Ranks in the group, rank 0 included.
    pub(crate) fn size(&self) -> usize {
        self.workers.len() + 1
    }

    /// Rank 0's membership of the group.
    pub(crate) fn group(&self) -> &Arc<ProcessGroup> {
        &self.group
    }

    /// Hands every rank its job (`make(rank, device)` is called here, on the scheduler's thread).
    pub(crate) fn start(&mut self, make: impl Fn(usize, Device) -> Job) -> Result<()> {
        if let Some(error) = &self.broken {
            return Err(Error::Engine(error.clone()));
        }
        for worker in &self.workers {
            let sent = worker
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send(make(worker.rank, worker.device)).is_ok());
            if !sent {
                let error = format!("tensor-parallel rank {} has stopped", worker.rank);
                self.broken = Some(error.clone());
                return Err(Error::Engine(error));
            }
        }
        Ok(())
    }

    /// Waits for every rank's job; the first error (a rank's, or `local`, rank 0's) fails the step.
    pub(crate) fn finish(&mut self) -> Result<()> {
        let mut first = None;
        for worker in &self.workers {
            let result = worker.done.recv().unwrap_or_else(|_| {
                Err(Error::Engine(format!(
                    "tensor-parallel rank {} has stopped",
                    worker.rank
                )))
            });
            if let Err(e) = result {
                first.get_or_insert(format!("tensor-parallel rank {}: {e}", worker.rank));
            }
        }
        match first {
            Some(error) => {
                self.broken = Some(error.clone());
                Err(Error::Engine(error))
            }
            None => Ok(()),
        }
    }

    /// Runs `make`'s job on every rank and `local` on this thread (rank 0) at the same time, and waits
    /// for all of them.
    pub(crate) fn run<T>(
        &mut self,
        make: impl Fn(usize, Device) -> Job,
        local: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.start(make)?;
        let ours = local();
        let theirs = self.finish();
        match (ours, theirs) {
            (Ok(value), Ok(())) => Ok(value),
            (Err(e), Ok(())) => {
                self.broken = Some(format!("tensor-parallel rank 0: {e}"));
                Err(e)
            }
            (_, Err(e)) => Err(e),
        }
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            worker.jobs.take();
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mmreg_core::{Collectives, KvCacheSpec, LanguageModel, Step};
    use tch::{Kind, Tensor};

    use super::*;
    use crate::dist::{new_group, Backend};

    /// A model that is only a rank to run jobs on.
    struct Nothing;

    impl LanguageModel for Nothing {
        fn embed_tokens(&self, _: &Tensor) -> Result<Tensor> {
            Ok(Tensor::new())
        }
        fn forward(&self, _: &Tensor, _: &mut Step) -> Result<Tensor> {
            Ok(Tensor::new())
        }
        fn kv_cache_spec(&self) -> KvCacheSpec {
            KvCacheSpec::new(1, 1, 1, Kind::Float)
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn max_model_len(&self) -> usize {
            1
        }
    }

    impl MultiModalModel for Nothing {
        fn language_model(&self) -> &dyn LanguageModel {
            self
        }
    }

    fn ranks(size: usize, timeout: Duration) -> Ranks {
        let groups = new_group(size, Backend::Gloo, timeout).expect("group");
        let mut ranks = Ranks::spawn(&groups, &vec![Device::Cpu; size], |_| {
            Ok(Box::new(Nothing) as Box<dyn MultiModalModel>)
        })
        .expect("ranks");
        ranks.finish().expect("loaded");
        ranks
    }

    #[test]
    fn every_rank_runs_the_step_with_rank_0() {
        let mut ranks = ranks(3, Duration::from_secs(30));
        let group = ranks.group().clone();
        let sum = ranks
            .run(
                |rank, _| {
                    Box::new(move |state: &mut RankState| {
                        let mut t = Tensor::from_slice(&[rank as f32]);
                        state.group.all_reduce(&mut t)
                    })
                },
                || {
                    let mut t = Tensor::from_slice(&[0.0f32]);
                    group.all_reduce(&mut t)?;
                    Ok(t.double_value(&[0]))
                },
            )
            .expect("step");
        assert_eq!(sum, 3.0);
    }

    #[test]
    fn a_rank_that_fails_or_panics_fails_the_step_and_every_later_one_without_a_hang() {
        for panics in [false, true] {
            let mut ranks = ranks(2, Duration::from_millis(500));
            let group = ranks.group().clone();
            let started = std::time::Instant::now();
            let error = ranks
                .run(
                    |_, _| {
                        Box::new(move |_: &mut RankState| {
                            if panics {
                                panic!("rank 1 lost its device");
                            }
                            Err(Error::Engine("rank 1 lost its device".into()))
                        })
                    },
                    // Rank 0 waits in a collective that rank 1 never joins: the timeout ends it.
                    || {
                        let mut t = Tensor::from_slice(&[1.0f32]);
                        group.all_reduce(&mut t)
                    },
                )
                .expect_err("rank 1 failed");
            assert!(started.elapsed() < Duration::from_secs(20));
            let message = error.to_string();
            assert!(
                message.contains("tensor-parallel rank 1") && message.contains("lost its device"),
                "{message}"
            );
            let later = ranks
                .run(|_, _| Box::new(|_: &mut RankState| Ok(())), || Ok(()))
                .expect_err("broken");
            assert!(later.to_string().contains("rank 1"), "{later}");
        }
    }
}
