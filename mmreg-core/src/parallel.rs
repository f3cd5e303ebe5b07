//! Tensor parallelism as the layers see it: a rank of a group and the group's collectives. The engine
//! makes the group (c10d through its shim: Gloo on CPUs, NCCL on GPUs) and hands each rank's model its
//! handle through [`crate::LoadOptions::tensor_parallel`]; the parallel layers of `mmreg-nn` read their
//! slices of the weights and call the collectives. Model files never see it.

use tch::Tensor;

use crate::Result;

/// One rank's view of a tensor-parallel group.
pub trait Collectives: Send + Sync + std::fmt::Debug {
    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn size(&self) -> usize;

    /// Sums `tensor` over the group, in place (every rank ends with the sum).
    fn all_reduce(&self, tensor: &mut Tensor) -> Result<()>;

    /// Every rank's `tensor` (the same shape on each) concatenated along dim 0 in rank order.
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor>;

    /// Overwrites `tensor` with rank `root`'s, on every rank.
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()>;
}

/// A rank's share of `total` items split over `size` ranks in contiguous runs of `⌈total / size⌉` (the
/// last run shorter, or empty): `(start, len)`.
pub fn shard(total: i64, rank: usize, size: usize) -> (i64, i64) {
    let size = size.max(1) as i64;
    let per = (total + size - 1) / size;
    let start = (per * rank as i64).min(total);
    (start, per.min(total - start))
}

#[cfg(test)]
mod tests {
    use super::shard;

    #[test]
    fn shards_cover_every_item_once() {
        for (total, size) in [(8, 2), (10, 4), (3, 4), (32000, 3)] {
            let mut next = 0;
            for rank in 0..size {
                let (start, len) = shard(total, rank, size);
                assert_eq!(start, next.min(total));
                next = start + len;
            }
            assert_eq!(next, total);
        }
        assert_eq!(shard(10, 3, 4), (9, 1));
        assert_eq!(shard(3, 3, 4), (3, 0));
    }
}
