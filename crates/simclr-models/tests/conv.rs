//! The im2col + GEMM convolution against candle's `conv2d`: forward values and the gradients
//! with respect to the input and the kernel, over random shapes; and the adjointness of the
//! unfold (`Im2Col`) and the fold (`Col2Im`).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{f32_values, pseudo_random, rel_err, values};
use simclr_kernels::conv::{
    conv2d_with, Col2Im, Conv2dGemm, ConvBackend, ConvGeometry, ConvInputGrad, ConvKernelGrad,
    Im2Col, InputGradPath, Products,
};

const TOL: f64 = 1e-4;

/// Output, input gradient and kernel gradient of `sum(conv(x, w) * r)`. With
/// [`ConvBackend::Candle`] this is candle's `conv2d` (explicitly padded and cropped where the
/// padding is asymmetric or the two axes leave different remainders).
fn run(
    x: &Tensor,
    w: &Tensor,
    r_seed: u64,
    g: ConvGeometry,
    backend: ConvBackend,
) -> (Tensor, Tensor, Tensor) {
    let xv = Var::from_tensor(x).unwrap();
    let wv = Var::from_tensor(w).unwrap();
    let y = conv2d_with(xv.as_tensor(), wv.as_tensor(), g, backend).unwrap();
    let r = pseudo_random(y.dims(), r_seed, -1.0, 1.0);
    let loss = (&y * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let gx = grads.get(xv.as_tensor()).expect("input gradient").clone();
    let gw = grads.get(wv.as_tensor()).expect("kernel gradient").clone();
    (y, gx, gw)
}

/// (batch, in channels, height, width, out channels, geometry)
type Case = (usize, usize, usize, usize, usize, ConvGeometry);

/// A case's input (from `seed`) and kernel (from `seed + 1`).
fn operands(&(n, c, h, w, o, g): &Case, seed: u64) -> (Tensor, Tensor) {
    (
        pseudo_random(&[n, c, h, w], seed, -1.0, 1.0),
        pseudo_random(&[o, c, g.kh, g.kw], seed + 1, -0.5, 0.5),
    )
}

fn check(cases: &[Case]) {
    for (idx, case) in cases.iter().enumerate() {
        let g = case.5;
        let seed = 1000 + idx as u64 * 7;
        let (x, k) = operands(case, seed);
        let (y0, gx0, gw0) = run(&x, &k, seed + 2, g, ConvBackend::Candle);
        let (y1, gx1, gw1) = run(&x, &k, seed + 2, g, ConvBackend::Im2colGemm);
        let what = format!("case {idx}: x {:?} w {:?} {g:?}", x.dims(), k.dims());
        assert_eq!(y1.dims(), y0.dims(), "{what}: output shape");
        assert!(y1.is_contiguous(), "{what}: output not contiguous");
        let (ey, ex, ew) = (rel_err(&y1, &y0), rel_err(&gx1, &gx0), rel_err(&gw1, &gw0));
        assert!(ey < TOL, "{what}: forward rel err {ey:e}");
        assert!(ex < TOL, "{what}: input gradient rel err {ex:e}");
        assert!(ew < TOL, "{what}: kernel gradient rel err {ew:e}");
    }
}

#[test]
fn matches_candle_conv2d_3x3() {
    let s = ConvGeometry::symmetric;
    check(&[
        (1, 3, 9, 9, 5, s(3, 1, 1)),
        (2, 5, 7, 11, 13, s(3, 1, 1)),
        (3, 13, 11, 9, 6, s(3, 2, 1)),
        (1, 17, 16, 16, 9, s(3, 2, 1)),
        (4, 6, 5, 5, 10, s(3, 1, 0)),
        (2, 7, 1, 1, 3, s(3, 1, 1)),
        (2, 9, 2, 3, 4, s(3, 2, 1)),
    ]);
}

#[test]
fn matches_candle_conv2d_1x1() {
    let s = ConvGeometry::symmetric;
    check(&[
        (1, 3, 9, 9, 5, s(1, 1, 0)),
        (3, 13, 7, 5, 11, s(1, 1, 0)),
        (2, 10, 9, 9, 17, s(1, 2, 0)),
        (3, 5, 8, 6, 7, s(1, 2, 0)),
    ]);
}

#[test]
fn matches_candle_conv2d_7x7() {
    let s = ConvGeometry::symmetric;
    check(&[
        (2, 3, 15, 13, 8, s(7, 2, 3)),
        (1, 5, 9, 9, 6, s(7, 1, 3)),
        (3, 3, 5, 5, 4, s(7, 2, 3)),
    ]);
}

#[test]
fn matches_candle_conv2d_asymmetric_padding() {
    // TF SAME padding of an even input at stride 2 pads (0, 1); larger totals pad (p, p + 1).
    let g = |k: usize, stride: usize, top: usize, left: usize, bottom: usize, right: usize| {
        ConvGeometry {
            kh: k,
            kw: k,
            stride,
            pad_top: top,
            pad_left: left,
            pad_bottom: bottom,
            pad_right: right,
        }
    };
    check(&[
        (2, 5, 8, 8, 6, g(3, 2, 0, 0, 1, 1)),
        (1, 7, 10, 12, 3, g(7, 2, 2, 3, 3, 2)),
        (3, 4, 9, 7, 5, g(3, 1, 2, 0, 0, 2)),
        (2, 3, 6, 6, 2, g(1, 1, 1, 0, 0, 1)),
    ]);
}

#[test]
fn larger_batch_matches() {
    // The batch is cut into chunks of whole images holding >= 256 output pixels, run in parallel
    // when there are enough of them: cover one-image and many-image chunks, a short last chunk,
    // and the serial path with multi-threaded GEMMs.
    let s = ConvGeometry::symmetric;
    check(&[
        (9, 19, 13, 13, 21, s(3, 1, 1)),
        (8, 11, 14, 15, 12, s(3, 2, 1)),
        (70, 5, 4, 4, 7, s(3, 1, 1)),
        (37, 6, 7, 7, 9, s(1, 2, 0)),
        (6, 3, 17, 17, 4, s(3, 1, 1)),
        (5, 4, 16, 16, 3, s(1, 1, 0)),
        (33, 9, 4, 4, 5, s(1, 1, 0)),
        (2, 3, 29, 31, 8, s(7, 2, 3)),
        // Rows a multiple of 256 floats apart get a padded stride in the scratch matrices: one
        // image of a 32² plane per chunk (forward, kernel gradient and the fold), and chunks of
        // several 32² and 16² images.
        (1, 20, 32, 32, 20, s(3, 1, 1)),
        (2, 3, 32, 32, 4, s(3, 1, 1)),
        (3, 4, 16, 16, 5, s(3, 1, 1)),
    ]);
}

#[test]
fn other_dtypes_fall_back_to_candle() {
    let x = pseudo_random(&[2, 3, 5, 5], 1, -1.0, 1.0)
        .to_dtype(DType::F64)
        .unwrap();
    let w = pseudo_random(&[4, 3, 3, 3], 2, -1.0, 1.0)
        .to_dtype(DType::F64)
        .unwrap();
    let g = ConvGeometry::symmetric(3, 1, 1);
    let y = conv2d_with(&x, &w, g, ConvBackend::Im2colGemm).unwrap();
    let y0 = x.conv2d(&w, 1, 1, 1, 1).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    assert!(rel_err(&y, &y0) < 1e-12);
}

#[test]
fn mismatched_kernel_is_an_error() {
    let x = Tensor::zeros((1, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let g = ConvGeometry::symmetric(3, 1, 1);
    assert!(conv2d_with(&x, &w, g, ConvBackend::Im2colGemm).is_err());
    let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d_with(
        &x,
        &w,
        ConvGeometry::symmetric(5, 1, 1),
        ConvBackend::Im2colGemm
    )
    .is_err());
}

/// `<a, b>` accumulated in f64.
fn dot_f64(a: &Tensor, b: &Tensor) -> f64 {
    values(a).iter().zip(values(b)).map(|(x, y)| x * y).sum()
}

#[test]
fn col2im_is_the_adjoint_of_im2col() {
    let geometries = [
        ConvGeometry::symmetric(3, 1, 1),
        ConvGeometry::symmetric(3, 2, 1),
        ConvGeometry::symmetric(7, 2, 3),
        ConvGeometry::symmetric(1, 2, 0),
        ConvGeometry {
            kh: 3,
            kw: 5,
            stride: 2,
            pad_top: 0,
            pad_left: 2,
            pad_bottom: 1,
            pad_right: 3,
        },
    ];
    for (idx, &g) in geometries.iter().enumerate() {
        let (n, c, h, w) = (3, 5, 9, 8);
        let seed = 50 + idx as u64;
        let x = pseudo_random(&[n, c, h, w], seed, -1.0, 1.0);
        let cols = x.apply_op1_no_bwd(&Im2Col(g)).unwrap();
        let (ho, wo) = g.out_size(h, w).unwrap();
        assert_eq!(cols.dims(), &[n, g.kh * g.kw * c, ho * wo]);
        let y = pseudo_random(cols.dims(), seed + 100, -1.0, 1.0);
        let fold = Col2Im {
            geometry: g,
            c,
            h,
            w,
        };
        let folded = y.apply_op1_no_bwd(&fold).unwrap();
        assert_eq!(folded.dims(), x.dims());
        let (lhs, rhs) = (dot_f64(&cols, &y), dot_f64(&x, &folded));
        // col2im's sums are rounded to f32 once per element.
        let scale: f64 = values(&x)
            .iter()
            .zip(values(&folded))
            .map(|(a, b)| (a * b).abs())
            .sum();
        assert!(
            (lhs - rhs).abs() <= 1e-6 * scale,
            "{g:?}: <im2col(x), y> = {lhs} but <x, col2im(y)> = {rhs}"
        );

        // Im2Col's backward is Col2Im, and the other way round.
        let xv = Var::from_tensor(&x).unwrap();
        let loss = (xv.as_tensor().apply_op1(Im2Col(g)).unwrap() * &y)
            .unwrap()
            .sum_all()
            .unwrap();
        let gx = loss
            .backward()
            .unwrap()
            .get(xv.as_tensor())
            .unwrap()
            .clone();
        assert_eq!(values(&gx), values(&folded));
        let yv = Var::from_tensor(&y).unwrap();
        let fold = Col2Im {
            geometry: g,
            h,
            w,
            c,
        };
        let loss = (yv.as_tensor().apply_op1(fold).unwrap() * &x)
            .unwrap()
            .sum_all()
            .unwrap();
        let gy = loss
            .backward()
            .unwrap()
            .get(yv.as_tensor())
            .unwrap()
            .clone();
        assert_eq!(values(&gy), values(&cols));
    }
}

#[test]
fn im2col_rows_hold_the_windows() {
    // One 3x4 single-channel image, 3x3 kernel, padding 1: column (ho, wo) of the unfold is the
    // 3x3 neighbourhood of pixel (ho, wo), row (i, j) the image shifted by (i - 1, j - 1).
    let x = Tensor::arange(1f32, 13., &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 3, 4))
        .unwrap();
    let cols = x
        .apply_op1_no_bwd(&Im2Col(ConvGeometry::symmetric(3, 1, 1)))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .t()
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(cols.len(), 12);
    assert_eq!(cols[0], [0., 0., 0., 0., 1., 2., 0., 5., 6.]);
    assert_eq!(cols[5], [1., 2., 3., 5., 6., 7., 9., 10., 11.]);
    assert_eq!(cols[11], [7., 8., 0., 11., 12., 0., 0., 0., 0.]);
    // Stride 2 without padding on a 5x5 image: the four 3x3 windows at (0,0), (0,2), (2,0), (2,2).
    let x = Tensor::arange(0f32, 25., &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 5, 5))
        .unwrap();
    let cols = x
        .apply_op1_no_bwd(&Im2Col(ConvGeometry::symmetric(3, 2, 0)))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .t()
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(cols[3], [12., 13., 14., 17., 18., 19., 22., 23., 24.]);
}

#[test]
fn gradient_ops_match_autograd_of_the_convolution() {
    // ConvInputGrad and ConvKernelGrad called directly equal the gradients that backward()
    // routes through Conv2dGemm (and those match candle in the tests above).
    let g = ConvGeometry::symmetric(3, 2, 1);
    let x = pseudo_random(&[5, 6, 9, 7], 7, -1.0, 1.0);
    let w = pseudo_random(&[4, 6, 3, 3], 8, -1.0, 1.0);
    let (y, gx, gw) = run(&x, &w, 9, g, ConvBackend::Im2colGemm);
    let y2 = x
        .apply_op2_no_bwd(&w, &Conv2dGemm(g, Products::F32))
        .unwrap();
    assert_eq!(values(&y), values(&y2));
    let r = pseudo_random(y.dims(), 9, -1.0, 1.0);
    let op = ConvInputGrad {
        geometry: g,
        h: 9,
        w: 7,
        products: Products::F32,
        path: None,
    };
    assert_eq!(values(&r.apply_op2_no_bwd(&w, &op).unwrap()), values(&gx));
    let gw2 = x
        .apply_op2_no_bwd(&r, &ConvKernelGrad(g, Products::F32))
        .unwrap();
    assert!(rel_err(&gw2, &gw) < 1e-6);
}

#[test]
fn both_input_gradient_paths_match_candle() {
    // The fold and the convolution of the output gradient, each forced, on the stride-1 windows
    // (the convolution's only ones: square, asymmetric, zero and full padding, pointwise) and on
    // chunks of one and of several images; a stride-2 window asked for the convolution folds.
    let s = ConvGeometry::symmetric;
    let asym = ConvGeometry {
        kh: 3,
        kw: 3,
        stride: 1,
        pad_top: 2,
        pad_left: 0,
        pad_bottom: 0,
        pad_right: 2,
    };
    let cases: [Case; 8] = [
        (2, 5, 7, 11, 13, s(3, 1, 1)),
        (4, 6, 5, 5, 10, s(3, 1, 0)),
        (3, 4, 9, 7, 5, asym),
        (1, 5, 9, 9, 6, s(7, 1, 3)),
        (3, 13, 7, 5, 11, s(1, 1, 0)),
        (70, 5, 4, 4, 7, s(3, 1, 1)),
        (6, 16, 28, 28, 16, s(3, 1, 1)),
        (3, 13, 11, 9, 6, s(3, 2, 1)),
    ];
    for (idx, case) in cases.iter().enumerate() {
        let (_, _, h, w, _, g) = *case;
        let seed = 3000 + idx as u64 * 5;
        let (x, k) = operands(case, seed);
        let (y0, gx0, _) = run(&x, &k, seed + 2, g, ConvBackend::Candle);
        let r = pseudo_random(y0.dims(), seed + 2, -1.0, 1.0);
        for path in [InputGradPath::Fold, InputGradPath::Convolution] {
            let op = ConvInputGrad {
                geometry: g,
                h,
                w,
                products: Products::F32,
                path: Some(path),
            };
            let gx = r.apply_op2_no_bwd(&k, &op).unwrap();
            let e = rel_err(&gx, &gx0);
            assert!(e < TOL, "case {idx} {g:?} {path:?}: rel err {e:e}");
        }
    }
}

#[test]
fn the_input_gradient_path_follows_its_rule() {
    let choose = InputGradPath::choose;
    let s = ConvGeometry::symmetric;
    let (f32, bf16) = (Products::F32, Products::Bf16);
    // The pipeline's first stage (16 channels, 28²) and every plane of 16² or less.
    assert_eq!(
        choose(s(3, 1, 1), f32, 16, 16, 784),
        InputGradPath::Convolution
    );
    assert_eq!(
        choose(s(3, 1, 1), f32, 128, 128, 16),
        InputGradPath::Convolution
    );
    assert_eq!(
        choose(s(3, 1, 1), f32, 512, 512, 256),
        InputGradPath::Convolution
    );
    // Wide layers on large planes take the convolution where Winograd computes it.
    let winograd = if simclr_kernels::winograd::enabled() {
        InputGradPath::Convolution
    } else {
        InputGradPath::Fold
    };
    assert_eq!(choose(s(3, 1, 1), f32, 64, 64, 1024), winograd);
    // Thin layers on large planes, strides above 1, paddings wider than k - 1, and bf16 fold.
    assert_eq!(choose(s(3, 1, 1), f32, 16, 64, 1024), InputGradPath::Fold);
    assert_eq!(choose(s(3, 1, 1), f32, 32, 32, 784), InputGradPath::Fold);
    assert_eq!(choose(s(3, 2, 1), f32, 16, 16, 196), InputGradPath::Fold);
    assert_eq!(choose(s(1, 1, 1), f32, 16, 16, 100), InputGradPath::Fold);
    assert_eq!(choose(s(0, 1, 0), f32, 16, 16, 100), InputGradPath::Fold);
    assert_eq!(choose(s(3, 1, 1), bf16, 16, 16, 784), InputGradPath::Fold);
    assert_eq!(choose(s(3, 1, 1), bf16, 64, 64, 1024), InputGradPath::Fold);
}

#[test]
fn only_the_tracked_argument_gets_a_gradient() {
    // A constant input (the images) skips the input gradient and still trains the kernel.
    let g = ConvGeometry::symmetric(3, 1, 1);
    let x = pseudo_random(&[2, 3, 6, 6], 11, -1.0, 1.0);
    let w = Var::from_tensor(&pseudo_random(&[4, 3, 3, 3], 12, -1.0, 1.0)).unwrap();
    let y = conv2d_with(&x, w.as_tensor(), g, ConvBackend::Im2colGemm).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    let y0 = x.conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap();
    let g0 = y0.sum_all().unwrap().backward().unwrap();
    assert!(
        rel_err(
            grads.get(w.as_tensor()).unwrap(),
            g0.get(w.as_tensor()).unwrap()
        ) < TOL
    );
}

#[test]
fn repeated_runs_give_the_same_bits() {
    // The shapes of the default preset's network (width 16 at 28², both views of 256 images
    // → 512) and a stride-2 one; forward, input and kernel gradients, twice each on 2 threads.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for (n, c, o, hw, k, stride) in [
        (512usize, 3usize, 16usize, 28usize, 3usize, 1usize),
        (512, 16, 16, 28, 3, 1),
        (512, 16, 64, 28, 1, 1),
        (512, 32, 32, 14, 3, 1),
        (512, 16, 32, 28, 3, 2),
        (512, 64, 128, 7, 1, 2),
        (512, 128, 128, 4, 3, 1),
    ] {
        let x = pseudo_random(&[n, c, hw, hw], 7, -1.0, 1.0);
        let w = pseudo_random(&[o, c, k, k], 8, -0.5, 0.5);
        let g = ConvGeometry::symmetric(k, stride, (k - 1) / 2);
        let once = || {
            pool.install(|| {
                let (y, gx, gw) = run(&x, &w, 9, g, ConvBackend::Im2colGemm);
                [values(&y), values(&gx), values(&gw)]
            })
        };
        let first = once();
        for _ in 0..3 {
            let again = once();
            for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(first.iter().zip(&again)) {
                assert!(
                    a == b,
                    "{what} of {n}x{c}x{hw}x{hw} * {o}x{c}x{k}x{k}/{stride} differs between runs"
                );
            }
        }
    }
}

/// `t` with every element rounded to bf16 (candle's conversion), back in f32.
fn bf16_rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn bf16_products_equal_f32_convolution_of_rounded_operands() {
    // With bf16 products the forward pass is the f32 convolution of the bf16-rounded input and
    // kernel, and the gradients those of the same convolution for a bf16-rounded output
    // gradient: the same sums, added in another order. A path that skipped the rounding of any
    // operand (the output gradient included) would be off by about 1e-3, ten times the bound.
    use simclr_kernels::conv::conv2d_products_with;
    let s = ConvGeometry::symmetric;
    let cases: [Case; 5] = [
        (3, 3, 28, 28, 16, s(3, 1, 1)),
        (9, 16, 14, 14, 32, s(3, 2, 1)),
        (40, 32, 7, 7, 64, s(3, 1, 1)),
        (5, 24, 9, 9, 8, s(1, 1, 0)),
        (2, 3, 19, 17, 12, s(7, 2, 3)),
    ];
    for (idx, case) in cases.iter().enumerate() {
        let g = case.5;
        let seed = 5000 + idx as u64 * 11;
        let (x, k) = operands(case, seed);
        let what = format!("case {idx}: x {:?} w {:?} {g:?}", x.dims(), k.dims());
        let grads = |x: &Tensor, k: &Tensor, products: Products, backend, round_r: bool| {
            let xv = Var::from_tensor(x).unwrap();
            let wv = Var::from_tensor(k).unwrap();
            let y =
                conv2d_products_with(xv.as_tensor(), wv.as_tensor(), g, backend, products).unwrap();
            let mut r = pseudo_random(y.dims(), seed + 2, -1.0, 1.0);
            if round_r {
                r = bf16_rounded(&r);
            }
            let gr = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = gr.get(xv.as_tensor()).unwrap().clone();
            let gw = gr.get(wv.as_tensor()).unwrap().clone();
            (y, gx, gw)
        };
        let (y0, gx0, gw0) = grads(
            &bf16_rounded(&x),
            &bf16_rounded(&k),
            Products::F32,
            ConvBackend::Candle,
            true,
        );
        for backend in [ConvBackend::Im2colGemm, ConvBackend::Candle] {
            let (y1, gx1, gw1) = grads(&x, &k, Products::Bf16, backend, false);
            let (ey, ex, ew) = (rel_err(&y1, &y0), rel_err(&gx1, &gx0), rel_err(&gw1, &gw0));
            assert!(ey < TOL, "{what} {backend:?}: forward rel err {ey:e}");
            if backend == ConvBackend::Im2colGemm {
                assert!(ex < TOL, "{what}: input gradient rel err {ex:e}");
                assert!(ew < TOL, "{what}: kernel gradient rel err {ew:e}");
            }
        }
        // And the f32 products of the same operands are not those.
        let (y2, _, _) = grads(&x, &k, Products::F32, ConvBackend::Im2colGemm, false);
        assert!(rel_err(&y2, &y0) > 5e-4, "{what}: bf16 equals f32");
    }
}

#[test]
fn winograd_layers_match_candle_conv2d() {
    use simclr_kernels::winograd::{self, Sizes};
    let s = ConvGeometry::symmetric(3, 1, 1);
    // Odd and even planes (tiles cropped on the right and at the bottom), wide layers on small
    // planes and single pixels, more and fewer output than input channels, and batches cut
    // into several chunks (forward: 7 images of 64 channels at 16² and 64 of 256 at 2² a
    // chunk). The last two also take the Winograd kernel gradient (256 channels, 8² or more),
    // the very last over three chunks of 16 images.
    let cases = [
        (2, 64, 17, 16, 72, s),
        (9, 64, 16, 16, 64, s),
        (1, 256, 3, 5, 256, s),
        (1, 256, 1, 1, 260, s),
        (3, 257, 2, 3, 256, s),
        (70, 256, 2, 2, 256, s),
        (5, 256, 9, 8, 256, s),
        (40, 256, 8, 8, 256, s),
    ];
    check(&cases);
    // The kernel gradient's own entry point on layers the rule keeps on im2col, over several
    // chunks (16 images of 8² each) summed in order, against candle's.
    for (idx, case) in [(20, 64, 8, 8, 64, s), (3, 64, 7, 9, 80, s)]
        .iter()
        .enumerate()
    {
        let &(n, c, h, w, o, g) = case;
        let (x, k) = operands(case, 70 + idx as u64);
        let (y, _, gw0) = run(&x, &k, 80 + idx as u64, g, ConvBackend::Candle);
        let r = pseudo_random(y.dims(), 80 + idx as u64, -1.0, 1.0);
        let own = winograd::kernel_grad(Sizes { n, c, h, w, o }, &f32_values(&x), &f32_values(&r))
            .unwrap();
        let own = Tensor::from_vec(own, gw0.dims(), &Device::Cpu).unwrap();
        let e = rel_err(&own, &gw0);
        assert!(e < TOL, "kernel gradient {case:?}: rel err {e:e}");
    }
    // Sizes that do not match the buffers are an error, not a panic.
    let bad = Sizes {
        n: 2,
        c: 64,
        h: 4,
        w: 4,
        o: 64,
    };
    assert!(winograd::forward(bad, &[0.0; 10], &[0.0; 64 * 64 * 9]).is_err());
    assert!(winograd::kernel_grad(bad, &[0.0; 2 * 64 * 16], &[0.0; 3]).is_err());
    // The layers above did take the Winograd path: its own output, bit for bit.
    if !winograd::enabled() {
        return; // SIMCLR_WINOGRAD=0: the im2col path was checked instead.
    }
    for (idx, case) in cases.iter().enumerate() {
        let &(n, c, h, w, o, g) = case;
        assert!(winograd::applies(g, Products::F32, c, o, h * w));
        let (x, k) = operands(case, 50 + idx as u64);
        let y = conv2d_with(&x, &k, g, ConvBackend::Im2colGemm).unwrap();
        let own =
            winograd::forward(Sizes { n, c, h, w, o }, &f32_values(&x), &f32_values(&k)).unwrap();
        assert_eq!(f32_values(&y), own);
        if winograd::applies_to_kernel_grad(g, Products::F32, c, o, h * w) {
            let gy = pseudo_random(y.dims(), 90 + idx as u64, -1.0, 1.0);
            let gw = x
                .apply_op2_no_bwd(&gy, &ConvKernelGrad(g, Products::F32))
                .unwrap();
            let own =
                winograd::kernel_grad(Sizes { n, c, h, w, o }, &f32_values(&x), &f32_values(&gy))
                    .unwrap();
            assert_eq!(f32_values(&gw), own);
        }
    }
    // The rule: (window, products, C, O, plane) -> (forward, kernel gradient). The kernel
    // gradient only on wide layers with planes of 8² or more; thinner layers, middling widths
    // on small planes, other windows and bf16 stay on im2col.
    let other = ConvGeometry::symmetric;
    let rule = [
        (s, Products::F32, 256, 256, 64, (true, true)),
        (s, Products::F32, 256, 256, 16, (true, false)),
        (s, Products::F32, 128, 256, 1024, (true, false)),
        (s, Products::F32, 128, 128, 256, (true, false)),
        (s, Products::F32, 128, 128, 255, (false, false)),
        (s, Products::F32, 32, 64, 1024, (false, false)),
        (s, Products::F32, 64, 63, 1024, (false, false)),
        (other(3, 2, 1), Products::F32, 64, 64, 1024, (false, false)),
        (other(3, 1, 0), Products::F32, 64, 64, 1024, (false, false)),
        (other(5, 1, 2), Products::F32, 64, 64, 1024, (false, false)),
        (s, Products::Bf16, 64, 64, 1024, (false, false)),
    ];
    for (g, products, c, o, plane, want) in rule {
        let got = (
            winograd::applies(g, products, c, o, plane),
            winograd::applies_to_kernel_grad(g, products, c, o, plane),
        );
        assert_eq!(got, want, "{g:?} {products:?} {c}->{o} on {plane} pixels");
    }
}

#[test]
fn both_winograd_tiles_match_a_float64_convolution() {
    use simclr_kernels::winograd::{self, Sizes};
    let s = ConvGeometry::symmetric(3, 1, 1);
    // Planes that hold whole 4×4 tiles and planes cropped on the right and at the bottom (by 1,
    // 2 and 3 pixels), single pixels, more and fewer output than input channels, and batches cut
    // into several chunks (at least 64 tiles a chunk for F(4×4)).
    let cases = [
        (2, 64, 17, 16, 72, s),
        (3, 64, 16, 15, 64, s),
        (2, 64, 14, 13, 64, s),
        (1, 256, 3, 5, 256, s),
        (1, 256, 1, 1, 260, s),
        (70, 256, 4, 4, 256, s),
        (40, 256, 8, 8, 256, s),
    ];
    for (idx, case) in cases.iter().enumerate() {
        let &(n, c, h, w, o, _) = case;
        let (x, k) = operands(case, 300 + idx as u64);
        let f64_ref = x
            .to_dtype(DType::F64)
            .unwrap()
            .conv2d(&k.to_dtype(DType::F64).unwrap(), 1, 1, 1, 1)
            .unwrap();
        let sizes = Sizes { n, c, h, w, o };
        let (xv, kv) = (f32_values(&x), f32_values(&k));
        let two = winograd::forward2(sizes, &xv, &kv).unwrap();
        let four = winograd::forward4(sizes, &xv, &kv).unwrap();
        let direct = conv2d_with(&x, &k, s, ConvBackend::Candle).unwrap();
        let as_tensor = |v: Vec<f32>| Tensor::from_vec(v, f64_ref.dims(), &Device::Cpu).unwrap();
        let (e2, e4, ec) = (
            rel_err(&as_tensor(two), &f64_ref),
            rel_err(&as_tensor(four), &f64_ref),
            rel_err(&direct, &f64_ref),
        );
        // F(2×2)'s coefficients (0, ±1, ±½) keep it as close as candle's direct sums (2e-7 to
        // 7e-7 against 1e-7 to 6e-7 here); F(4×4)'s (±2, ±4, 5, 8, sixths) lose about 4 more
        // bits (3e-7 to 1.2e-5).
        assert!(ec < 2e-6, "{case:?}: candle rel err {ec:e}");
        assert!(e2 < 2e-6, "{case:?}: F(2x2, 3x3) rel err {e2:e}");
        assert!(e4 < 3e-5, "{case:?}: F(4x4, 3x3) rel err {e4:e}");
    }
}
