//! Graph mechanics: only needed gradients are computed and kept, gradients of tensors used
//! more than once are summed, and no_grad records nothing.

use convnet::{no_grad, Conv2dParams, Rng, Tensor};

#[test]
fn only_the_leaves_that_need_a_gradient_get_one() {
    let x = Tensor::randn([2, 3, 5, 5], &mut Rng::new(0)); // data: no gradient
    let w = Tensor::randn([4, 3, 3, 3], &mut Rng::new(1)).requires_grad();
    let frozen_bias = Tensor::randn([4], &mut Rng::new(2)); // frozen parameter
    let loss = x
        .conv2d(&w, Some(&frozen_bias), Conv2dParams::default())
        .unwrap()
        .relu()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(
        grads.len(),
        1,
        "only w: no input, no frozen bias, no intermediate gradients are kept"
    );
    assert!(grads.get(&w).is_some());
    assert!(grads.get(&x).is_none() && grads.get(&frozen_bias).is_none());
}

#[test]
fn a_tensor_used_twice_sums_its_gradients() {
    // y = x*x + x  =>  dy/dx = 2x + 1 (the residual-connection pattern).
    let x = Tensor::from_vec(vec![-1.5, 0.0, 2.0], [3])
        .unwrap()
        .requires_grad();
    let y = x.mul(&x).unwrap().add(&x).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap().get(&x).unwrap().to_vec();
    assert_eq!(g, vec![-2.0, 1.0, 5.0]);
}

#[test]
fn no_grad_records_no_graph() {
    let w = Tensor::ones([3]).requires_grad();
    let y = no_grad(|| w.scale(2.0)).unwrap();
    assert!(!y.tracks_grad() && y.is_leaf());
    assert!(
        convnet::is_grad_enabled(),
        "the flag is restored afterwards"
    );
    assert!(y.sum_all().unwrap().backward().is_err());
}
