//! Functions over fixed-shape tensors, captured as CUDA graphs per shape on first use and replayed after.
//! A model's fixed-shape parts (a vision tower on images of one size, a decode step of one bucket) launch
//! hundreds of small kernels whose launch cost from the host exceeds their run time; a replay launches
//! them all at once.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;

use tch::{Device, Tensor};

use crate::cuda::{self, Graph, GraphPool};
use mmreg_core::Result;

/// What a captured function returns: tensors that every replay writes anew.
pub trait GraphOutput {
    /// Another handle on the same tensors.
    fn shallow_clone(&self) -> Self;
}

impl GraphOutput for Tensor {
    fn shallow_clone(&self) -> Self {
        Tensor::shallow_clone(self)
    }
}

struct Captured<O> {
    graph: Graph,
    inputs: Vec<Tensor>,
    output: O,
}

/// Graphs of one function, one per key (a shape or a bucket), returning `O` (a tensor by default). Off
/// CUDA, or where a capture failed, the function simply runs.
pub struct GraphCache<K, O = Tensor> {
    device: Device,
    /// The CUDA device index, where graphs are captured.
    capture_on: Option<usize>,
    graphs: HashMap<K, Captured<O>>,
    /// Keys whose capture failed (out of memory, say): they run eagerly from then on.
    failed: Vec<K>,
    pool: Option<GraphPool>,
}

impl<K: Hash + Eq + Clone + Debug, O: GraphOutput> GraphCache<K, O> {
    /// Captures on `device` if it is a CUDA device and graphs are available there.
    pub fn new(device: Device) -> Self {
        let capture_on = match device {
            Device::Cuda(i) if cuda::graphs_available() => Some(i),
            _ => None,
        };
        Self {
            device,
            capture_on,
            graphs: HashMap::new(),
            failed: Vec::new(),
            pool: None,
        }
    }

    /// Whether [`Self::run`] captures and replays (else it runs `f` directly).
    pub fn captures(&self) -> bool {
        self.capture_on.is_some()
    }

    /// `f(inputs)`, with the inputs moved to the cache's device. The first call with a key runs `f` on
    /// copies of `inputs` under capture; later calls copy `inputs` into those copies and replay. Every
    /// call with a key must pass inputs of the same shapes and dtypes, and `f` must be capturable: no
    /// host synchronisation, and nothing but its inputs may change between calls. The output of a replay
    /// is overwritten by the next replay of any graph of this cache: copy what must outlive it.
    pub fn run(
        &mut self,
        key: K,
        inputs: &[&Tensor],
        f: impl FnMut(&[Tensor]) -> Result<O>,
    ) -> Result<O> {
        self.run_patched(key, inputs, |_| Ok(()), f)
    }

    /// [`Self::run`], with `patch` writing into the inputs on the device (device tensors over parts of
    /// host ones) before `f` runs or the graph replays. Host inputs are copied straight into the graph's
    /// own buffers. Off CUDA an input already on the device is patched in place: pass a copy.
    pub fn run_patched(
        &mut self,
        key: K,
        inputs: &[&Tensor],
        patch: impl FnOnce(&mut [Tensor]) -> Result<()>,
        mut f: impl FnMut(&[Tensor]) -> Result<O>,
    ) -> Result<O> {
        let on_device = |inputs: &[&Tensor]| {
            inputs
                .iter()
                .map(|t| Ok(cuda::upload(t, self.device)?.f_contiguous()?))
                .collect::<Result<Vec<_>>>()
        };
        let Some(device) = self.capture_on.filter(|_| !self.failed.contains(&key)) else {
            let mut inputs = on_device(inputs)?;
            patch(&mut inputs)?;
            return f(&inputs);
        };
        if let Some(captured) = self.graphs.get_mut(&key) {
            for (target, source) in captured.inputs.iter_mut().zip(inputs) {
                cuda::upload_into(target, source)?;
            }
            patch(&mut captured.inputs)?;
        } else {
            // Buffers of the graph's own, whose addresses it keeps.
            let mut statics: Vec<Tensor> = on_device(inputs)?.iter().map(Tensor::copy).collect();
            patch(&mut statics)?;
            match Graph::capture(device, self.pool, || f(&statics)) {
                Ok((graph, output, pool)) => {
                    tracing::debug!(?key, "captured a CUDA graph");
                    self.pool = Some(pool);
                    let captured = Captured {
                        graph,
                        inputs: statics,
                        output,
                    };
                    self.graphs.insert(key.clone(), captured);
                }
                Err(error) => {
                    tracing::warn!(?key, %error, "CUDA graph capture failed; running this shape without a graph");
                    self.failed.push(key);
                    return f(&statics);
                }
            }
        }
        let Some(captured) = self.graphs.get(&key) else {
            unreachable!("captured above")
        };
        captured.graph.replay()?;
        Ok(captured.output.shallow_clone())
    }
}
