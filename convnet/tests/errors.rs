//! Bad input gives typed errors that name the op or layer and the shapes — never a panic.

use convnet::nn::{Conv2d, Dropout, Flatten, Linear, MaxPool2d, Mode, ReLU, Sequential};
use convnet::{AvgPool2dParams, Conv2dParams, Device, Error, MaxPool2dParams, Reduction, Tensor};

fn msg<T: std::fmt::Debug>(r: convnet::Result<T>) -> (Error, String) {
    let e = r.expect_err("expected an error");
    let s = e.to_string();
    (e, s)
}

#[test]
fn tutorial_flatten_size_for_28x28_is_caught_at_build_time_naming_fc1() {
    // The tutorial writes fc1 = Linear(64*7*7, 128), which only fits 28x28 images.
    let build = |hw: usize| {
        Sequential::new()
            .add("conv1", Conv2d::new(3, 32, 3).padding(1).build().unwrap())
            .add("relu1", ReLU)
            .add("pool1", MaxPool2d::new(2))
            .add("conv2", Conv2d::new(32, 64, 3).padding(1).build().unwrap())
            .add("relu2", ReLU)
            .add("pool2", MaxPool2d::new(2))
            .add("flatten", Flatten::new())
            .add("fc1", Linear::new(64 * 7 * 7, 128).unwrap())
            .add("relu3", ReLU)
            .add("fc2", Linear::new(128, 10).unwrap())
            .build(&[3, hw, hw])
    };
    let (e, s) = msg(build(32));
    assert!(
        matches!(&e, Error::Layer { layer, kind: "Linear", .. } if layer == "fc1"),
        "{e:?}"
    );
    assert!(
        s.contains("fc1") && s.contains("3136") && s.contains("4096"),
        "{s}"
    );
    assert!(
        s.contains("[1, 64, 8, 8]"),
        "names the shape that was flattened: {s}"
    );
    assert!(build(28).is_ok(), "the same model is valid for 28x28 input");
}

#[test]
fn conv_errors_name_the_op_and_shapes() {
    let x = Tensor::zeros([2, 3, 8, 8]);
    let w = Tensor::zeros([4, 3, 3, 3]);
    let (e, s) = msg(x.conv2d(&w, None, Conv2dParams::default().stride(0)));
    assert!(
        matches!(e, Error::InvalidArgument { op: "conv2d", .. }) && s.contains("stride"),
        "{s}"
    );
    let (_, s) = msg(x.conv2d(
        &Tensor::zeros([4, 3, 11, 11]),
        None,
        Conv2dParams::default(),
    ));
    assert!(s.contains("larger than the padded input"), "{s}");
    let (e, s) = msg(x.conv2d(&Tensor::zeros([4, 2, 3, 3]), None, Conv2dParams::default()));
    assert!(
        matches!(e, Error::ShapeMismatch { op: "conv2d", .. }) && s.contains("[4, 2, 3, 3]"),
        "{s}"
    );
    let (_, s) = msg(Tensor::zeros([3, 8, 8]).conv2d(&w, None, Conv2dParams::default()));
    assert!(
        s.contains("[N, C, H, W]") && s.contains("[3, 8, 8]"),
        "wrong rank: {s}"
    );
    let (_, s) = msg(x.conv2d(&w, Some(&Tensor::zeros([5])), Conv2dParams::default()));
    assert!(s.contains("bias [4]"), "{s}");
    assert!(
        Conv2d::new(3, 4, 3).groups(2).build().is_err(),
        "channels not divisible by groups"
    );
}

#[test]
fn pooling_errors() {
    let x = Tensor::zeros([1, 2, 4, 4]);
    assert!(matches!(
        x.max_pool2d(MaxPool2dParams::new(2).stride(0)),
        Err(Error::InvalidArgument {
            op: "max_pool2d",
            ..
        })
    ));
    let (_, s) = msg(x.max_pool2d(MaxPool2dParams::new(2).padding(2)));
    assert!(s.contains("at most half"), "{s}");
    let (_, s) = msg(x.avg_pool2d(AvgPool2dParams::new(5)));
    assert!(s.contains("larger than the padded input"), "{s}");
    assert!(Tensor::zeros([4, 4])
        .max_pool2d(MaxPool2dParams::new(2))
        .is_err());
    assert!(x.adaptive_avg_pool2d((0, 1)).is_err());
}

#[test]
fn dropout_probability_must_be_a_probability() {
    assert!(matches!(
        Dropout::new(-0.1),
        Err(Error::InvalidArgument { op: "Dropout", .. })
    ));
    assert!(Dropout::new(1.5).is_err());
    let mut rng = convnet::Rng::new(0);
    assert!(matches!(
        Tensor::ones([3]).dropout(-0.5, true, &mut rng),
        Err(Error::InvalidArgument { op: "dropout", .. })
    ));
}

#[test]
fn loss_errors() {
    let logits = Tensor::zeros([2, 3]);
    let (e, s) = msg(logits.cross_entropy(&[0, 3], Reduction::Mean, 0.0));
    assert!(
        matches!(
            e,
            Error::ClassIndexOutOfRange {
                op: "cross_entropy",
                index: 3,
                num_classes: 3
            }
        ),
        "{s}"
    );
    assert!(
        logits.cross_entropy(&[0], Reduction::Mean, 0.0).is_err(),
        "target count"
    );
    assert!(
        logits.cross_entropy(&[0, 1], Reduction::Mean, 1.5).is_err(),
        "label smoothing range"
    );
    assert!(logits.nll_loss(&[7, 0], Reduction::Mean).is_err());
    assert!(logits
        .mse_loss(&Tensor::zeros([3, 2]), Reduction::Mean)
        .is_err());
    assert!(
        Tensor::zeros([6])
            .cross_entropy(&[0], Reduction::Mean, 0.0)
            .is_err(),
        "rank"
    );
}

#[test]
fn arithmetic_and_shape_errors() {
    let (e, s) = msg(Tensor::zeros([2, 3]).add(&Tensor::zeros([4])));
    assert!(
        matches!(e, Error::ShapeMismatch { op: "add", .. })
            && s.contains("[2, 3]")
            && s.contains("[4]"),
        "{s}"
    );
    let (_, s) = msg(Tensor::zeros([2, 3]).matmul(&Tensor::zeros([4, 5])));
    assert!(s.contains("matmul"), "{s}");
    let (_, s) = msg(Tensor::zeros([2, 3]).linear(&Tensor::zeros([4, 5]), None));
    assert!(s.contains("linear") && s.contains("[*, 5]"), "{s}");
    assert!(Tensor::zeros([2, 3]).reshape([4, 2]).is_err());
    assert!(Tensor::zeros([2, 3]).permute(&[0, 0]).is_err());
    assert!(Tensor::zeros([2, 3]).sum(&[2], false).is_err());
    assert!(Tensor::from_vec(vec![1.0; 5], [2, 3]).is_err());
    assert!(Tensor::concat(&[Tensor::zeros([2, 3]), Tensor::zeros([3, 3])], 1).is_err());
}

#[test]
fn batch_norm_needs_more_than_one_value_per_channel_in_training() {
    let x = Tensor::zeros([1, 2, 1, 1]);
    let (rm, rv) = (Tensor::zeros([2]), Tensor::ones([2]));
    assert!(x
        .batch_norm2d(&rm, &rv, None, None, true, 0.1, 1e-5)
        .is_err());
    assert!(x
        .batch_norm2d(&rm, &rv, None, None, false, 0.1, 1e-5)
        .is_ok());
    assert!(x
        .batch_norm2d(&Tensor::zeros([3]), &rv, None, None, false, 0.1, 1e-5)
        .is_err());
}

#[test]
fn backward_and_model_input_errors() {
    let (e, _) = msg(Tensor::ones([1]).backward());
    assert!(matches!(e, Error::Backward(_)));
    let (_, s) = msg(Tensor::ones([3]).requires_grad().backward());
    assert!(s.contains("scalar"), "{s}");
    let model = Sequential::new()
        .add("flatten", Flatten::new())
        .add("fc", Linear::new(12, 2).unwrap())
        .build(&[3, 2, 2])
        .unwrap();
    let (_, s) = msg(model.forward(&Tensor::zeros([5, 3, 4, 4]), Mode::Eval));
    assert!(
        s.contains("[N, 3, 2, 2]") && s.contains("[5, 3, 4, 4]"),
        "{s}"
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_is_a_clear_error_in_a_cpu_build() {
    let (e, s) = msg(Device::cuda(0));
    assert!(matches!(e, Error::CudaNotBuilt), "{s}");
    assert!(s.contains("built without CUDA"), "{s}");
    assert!(Device::parse("cuda:1").is_err());
    assert!(Device::parse("tpu").is_err());
    assert!(Tensor::zeros([1]).to_device(Device::Cuda(0)).is_err());
}

/// A CUDA build on a machine without a usable GPU: every way of asking for one (the device,
/// a tensor, a model) is a `CudaUnavailable` error with the reason, never a panic.
#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    let Err(e) = Device::cuda(0) else {
        eprintln!("a GPU is present; the no-GPU error path runs where there is none");
        return;
    };
    assert!(matches!(e, Error::CudaUnavailable(_)), "{e}");
    let e = Tensor::zeros([2]).to_device(Device::Cuda(0)).unwrap_err();
    assert!(matches!(e, Error::CudaUnavailable(_)), "{e}");
    let model = convnet::models::build("lenet5", [1, 28, 28], 10).unwrap();
    let e = model.to_device(Device::Cuda(0)).unwrap_err();
    assert!(matches!(e, Error::CudaUnavailable(_)), "{e}");
    assert_eq!(
        model.device(),
        Device::Cpu,
        "a failed move leaves the model where it was"
    );
}
