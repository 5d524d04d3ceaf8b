//! Embedding lookup forward and backward, mirroring `torch.nn.functional.embedding` with a
//! dense weight gradient (`sparse=False`).
//!
//! Legend: M = number of ids (the ids tensor's elements, any shape), V = rows of the table
//! (`num_embeddings`), D = `embedding_dim`. Ids arrive validated (each `< V`); the row
//! `padding_idx`, if any, is looked up like any other but receives no gradient, as in
//! PyTorch.

use rayon::prelude::*;

/// Forward: `y[m, :] = weight[ids[m], :]`, `weight [V, D]`, `y [M, D]`.
pub fn embedding_forward(ids: &[u32], weight: &[f32], dim: usize, y: &mut [f32]) {
    debug_assert_eq!(y.len(), ids.len() * dim);
    if dim == 0 {
        return;
    }
    y.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let at = id as usize * dim;
            row.copy_from_slice(&weight[at..at + dim]);
        });
}

/// Backward: `dweight [V, D]` (overwritten) = sum over m of `dy[m, :]` into row `ids[m]`,
/// except the row `padding_idx`, which stays zero.
///
/// Ids repeat, so rows are accumulated serially in id order of appearance (the same order
/// as PyTorch's CPU kernel, hence the same rounding); the columns of a row are independent
/// and split across threads when D is wide.
pub fn embedding_backward(
    ids: &[u32],
    dy: &[f32],
    dim: usize,
    padding_idx: Option<usize>,
    dweight: &mut [f32],
) {
    debug_assert_eq!(dy.len(), ids.len() * dim);
    dweight.fill(0.0);
    if dim == 0 {
        return;
    }
    for (m, &id) in ids.iter().enumerate() {
        if Some(id as usize) == padding_idx {
            continue;
        }
        let at = id as usize * dim;
        for (d, g) in dweight[at..at + dim]
            .iter_mut()
            .zip(&dy[m * dim..(m + 1) * dim])
        {
            *d += g;
        }
    }
}

/// Naive reference of both directions with explicit index arithmetic, for tests.
pub fn embedding_naive(
    ids: &[u32],
    weight: &[f32],
    dim: usize,
    dy: &[f32],
    padding_idx: Option<usize>,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; ids.len() * dim];
    let mut dw = vec![0f32; weight.len()];
    for m in 0..ids.len() {
        for d in 0..dim {
            y[m * dim + d] = weight[ids[m] as usize * dim + d];
            if padding_idx != Some(ids[m] as usize) {
                dw[ids[m] as usize * dim + d] += dy[m * dim + d];
            }
        }
    }
    (y, dw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    #[test]
    fn matches_the_naive_reference_with_repeats_and_padding() {
        let mut rng = Rng::new(11);
        let (v, dim) = (7usize, 5usize);
        let weight: Vec<f32> = (0..v * dim).map(|_| rng.normal()).collect();
        let ids: Vec<u32> = [3, 0, 3, 6, 2, 2, 2, 0, 1].to_vec();
        let dy: Vec<f32> = (0..ids.len() * dim).map(|_| rng.normal()).collect();
        for pad in [None, Some(2)] {
            let mut y = vec![0.0; ids.len() * dim];
            embedding_forward(&ids, &weight, dim, &mut y);
            let mut dw = vec![1.0; v * dim];
            embedding_backward(&ids, &dy, dim, pad, &mut dw);
            let (y_ref, dw_ref) = embedding_naive(&ids, &weight, dim, &dy, pad);
            assert_eq!(y, y_ref);
            assert_eq!(dw, dw_ref);
        }
    }
}
