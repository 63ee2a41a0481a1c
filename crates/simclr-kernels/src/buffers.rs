//! Output buffers of the CPU kernels, zeroed by the threads that fill them.
//!
//! Why: `vec![0.0; len]` zeroes the whole buffer on the calling thread while the pool's
//! workers wait. In a pretraining step of the pipeline's network (R18 width 16, 28², batch
//! 256×2) those serial `memset`s of activation-sized outputs were 5 % of the wall time (perf,
//! 2 threads). Zeroing each chunk on the worker that then fills it runs the zeroing on every
//! thread and leaves the chunk in that core's cache for the fill.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A vector of `len` floats built in parallel: each chunk of `chunk` floats (the last may be
/// shorter) is zeroed and then given to `fill(chunk index, chunk)` on the same thread.
pub(crate) fn par_build<F>(len: usize, chunk: usize, fill: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| fill(i, zero(c)));
    // SAFETY: the chunks cover `0..len` and `zero` initialised every element of each.
    unsafe { v.set_len(len) };
    v
}

/// `len` zeros, written by the pool's threads.
pub(crate) fn par_zeroed(len: usize) -> Vec<f32> {
    // Chunks of 64 Ki floats: large enough to amortise the task, small enough to split evenly.
    par_build(len, 1 << 16, |_, _| {})
}

fn zero(c: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    c.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was initialised on the line above, and `MaybeUninit<f32>` has the
    // layout of `f32`.
    unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr().cast::<f32>(), c.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_in_order_and_start_at_zero() {
        for (len, chunk) in [(0, 4), (1, 4), (10, 3), (12, 4), (7, 100), (5, 0)] {
            let v = par_build(len, chunk, |i, c| {
                assert!(c.iter().all(|&x| x == 0.0), "chunk {i} not zeroed");
                for (j, x) in c.iter_mut().enumerate() {
                    *x = (i * chunk.max(1) + j) as f32;
                }
            });
            let want: Vec<f32> = (0..len).map(|k| k as f32).collect();
            assert_eq!(v, want, "len {len}, chunk {chunk}");
        }
        assert_eq!(par_zeroed(200_003), vec![0.0; 200_003]);
    }
}
