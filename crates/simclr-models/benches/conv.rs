//! Convolution throughput on the CPU: candle's `conv2d` against the im2col + GEMM custom ops of
//! `simclr_kernels::conv`, and what that does to a SimCLR training step.
//!
//! `cargo bench -p simclr-models --bench conv` prints (medians over timed runs after warm-up):
//!
//! * GFLOP/s of a 3×3 convolution 128→128 on 16×16, batch 128 (9.66 GFLOP per direction): the
//!   forward pass, the input gradient and the weight gradient, each timed as the op its
//!   backward pass runs (candle: the `conv_transpose2d` and the transposed `conv2d` of candle's
//!   autograd; custom: `ConvInputGrad` and `ConvKernelGrad`), and the whole forward +
//!   `backward()` through autograd;
//! * the input gradient of the stride-1 layers of the pipeline's and the CIFAR network by each
//!   of its two paths (`InputGradPath`), and which one the rule picks;
//! * the three ops of the CIFAR network's stride-1 3×3 layers with and without Winograd
//!   (`simclr_kernels::winograd`), and which ops its rule gives it (`-- winograd` prints this
//!   table alone);
//! * `-- tiles` (alone): the forward pass of the stride-1 3×3 layers of both networks by
//!   im2col, F(2×2, 3×3) and F(4×4, 3×3), in turn;
//! * images/s of one SimCLR training step's forward + backward (NT-Xent, no optimizer update)
//!   for an R18-CIFAR model at base width 16 on 28×28, 128 images × 2 views.
//!
//! Threads: rayon's default (all cores; set `RAYON_NUM_THREADS` to change it).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use simclr_kernels::conv::{
    conv2d_with, set_conv_backend, ConvBackend, ConvGeometry, ConvInputGrad, ConvKernelGrad,
    InputGradPath, Products,
};
use simclr_kernels::winograd;
use simclr_models::{ModelConfig, SimclrModel};

type R<T> = candle_core::Result<T>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median wall time in seconds of `f` over `runs` calls after `warmup` calls.
fn time<T>(warmup: usize, runs: usize, mut f: impl FnMut() -> R<T>) -> f64 {
    for _ in 0..warmup {
        f().expect("warm-up run");
    }
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                let out = f().expect("timed run");
                let dt = t.elapsed().as_secs_f64();
                drop(out);
                dt
            })
            .collect(),
    )
}

fn randn(shape: &[usize], std: f64) -> Tensor {
    Tensor::randn(0f32, std as f32, shape, &Device::Cpu).expect("randn")
}

struct Conv {
    n: usize,
    c: usize,
    h: usize,
    o: usize,
    g: ConvGeometry,
}

impl Conv {
    fn flops(&self) -> f64 {
        let (ho, wo) = self.g.out_size(self.h, self.h).unwrap();
        2.0 * (self.n * ho * wo * self.o * self.c * self.g.kh * self.g.kw) as f64
    }
}

/// Seconds for (forward, input gradient, weight gradient, forward + backward).
fn bench_candle(p: &Conv, x: &Tensor, w: &Tensor, gy: &Tensor) -> [f64; 4] {
    let pad = p.g.pad_top;
    let s = p.g.stride;
    let fwd = time(1, 7, || x.conv2d(w, pad, s, 1, 1));
    // The two ops of candle 0.11's Conv2D backward.
    let out_size = (gy.dim(2).unwrap() - 1) * s + p.g.kh - 2 * pad;
    let out_padding = p.h - out_size;
    let dx = time(1, 7, || gy.conv_transpose2d(w, pad, out_padding, s, 1));
    let dw = time(1, 7, || {
        x.transpose(0, 1)?
            .conv2d(&gy.transpose(0, 1)?, pad, 1, s, 1)?
            .transpose(0, 1)
    });
    let total = time(1, 3, || fwd_bwd(x, w, gy, p.g, ConvBackend::Candle));
    [fwd, dx, dw, total]
}

/// Seconds for (forward, input gradient, weight gradient, forward + backward).
fn bench_custom(p: &Conv, x: &Tensor, w: &Tensor, gy: &Tensor) -> [f64; 4] {
    let g = p.g;
    let fwd = time(1, 7, || conv2d_with(x, w, g, ConvBackend::Im2colGemm));
    // The two ops of Conv2dGemm's backward.
    let input_grad = ConvInputGrad {
        geometry: g,
        h: p.h,
        w: p.h,
        products: Products::F32,
        path: None,
    };
    let dx = time(1, 7, || gy.apply_op2_no_bwd(w, &input_grad));
    let dw = time(1, 7, || {
        x.apply_op2_no_bwd(gy, &ConvKernelGrad(g, Products::F32))
    });
    let total = time(1, 3, || fwd_bwd(x, w, gy, g, ConvBackend::Im2colGemm));
    [fwd, dx, dw, total]
}

/// Forward, then `backward()` of `<y, gy>`; returns both gradients.
fn fwd_bwd(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    g: ConvGeometry,
    b: ConvBackend,
) -> R<(Tensor, Tensor)> {
    let xv = Var::from_tensor(x)?;
    let wv = Var::from_tensor(w)?;
    let y = conv2d_with(xv.as_tensor(), wv.as_tensor(), g, b)?;
    let grads = (y * gy)?.sum_all()?.backward()?;
    Ok((
        grads.get(xv.as_tensor()).unwrap().clone(),
        grads.get(wv.as_tensor()).unwrap().clone(),
    ))
}

fn conv_table() {
    let p = Conv {
        n: 128,
        c: 128,
        h: 16,
        o: 128,
        g: ConvGeometry::symmetric(3, 1, 1),
    };
    let x = randn(&[p.n, p.c, p.h, p.h], 1.0);
    let w = randn(&[p.o, p.c, 3, 3], 0.05);
    let gy = randn(&[p.n, p.o, p.h, p.h], 1.0);
    let gf = p.flops() / 1e9;
    println!(
        "3x3 conv {}->{} on {}x{}, batch {} ({gf:.2} GFLOP per direction), GFLOP/s (ms):",
        p.c, p.o, p.h, p.h, p.n
    );
    let a = bench_candle(&p, &x, &w, &gy);
    let b = bench_custom(&p, &x, &w, &gy);
    println!(
        "  {:<26} {:>18} {:>18} {:>8}",
        "", "candle conv2d", "im2col + GEMM", "speed-up"
    );
    let names = [
        ("forward", 1.0),
        ("input gradient", 1.0),
        ("weight gradient", 1.0),
        ("forward + backward()", 3.0),
    ];
    for (i, (name, mult)) in names.iter().enumerate() {
        let f = gf * mult;
        println!(
            "  {name:<26} {:>8.1} ({:>6.1}) {:>8.1} ({:>6.1}) {:>7.2}x",
            f / a[i],
            a[i] * 1e3,
            f / b[i],
            b[i] * 1e3,
            a[i] / b[i]
        );
    }
}

/// NT-Xent (temperature 0.1) of 2·B projections whose rows i and i + B are the two views.
fn nt_xent(z: &Tensor) -> R<Tensor> {
    let n2 = z.dim(0)?;
    let b = n2 / 2;
    let h = z.broadcast_div(&z.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let sim = (h.matmul(&h.t()?)? / 0.1)?;
    let mask = (Tensor::eye(n2, DType::F32, z.device())? * 1e9)?;
    let logits = (sim - mask)?;
    let targets: Vec<u32> = (0..n2).map(|i| ((i + b) % n2) as u32).collect();
    let targets = Tensor::new(targets.as_slice(), z.device())?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.mean_all()?.neg()
}

fn step_table() {
    let images = 128;
    let size = 28;
    let config = ModelConfig {
        resnet_depth: 18,
        base_width: 16,
        num_classes: None,
        ..ModelConfig::default()
    }
    .with_image_size(size);
    let varmap = VarMap::new();
    let model = SimclrModel::init(&config, &varmap, 0, &Device::Cpu).expect("model");
    let x = Tensor::rand(0f32, 1f32, (2 * images, 3, size, size), &Device::Cpu).expect("x");
    let step = || -> R<f32> {
        let out = model.forward(&x, true)?;
        let loss = nt_xent(&out.proj_head_output)?;
        let grads = loss.backward()?;
        drop(grads);
        loss.to_scalar::<f32>()
    };
    println!(
        "SimCLR step (forward + backward, NT-Xent), R18-CIFAR base width 16, {size}x{size}, \
         {images} images x 2 views:"
    );
    let mut rates = Vec::new();
    for (name, backend) in [
        ("candle conv2d", ConvBackend::Candle),
        ("im2col + GEMM", ConvBackend::Im2colGemm),
    ] {
        set_conv_backend(backend);
        let t = time(1, 7, step);
        let rate = images as f64 / t;
        rates.push(rate);
        println!(
            "  {name:<26} {rate:>8.1} images/s  ({:.0} ms a step)",
            t * 1e3
        );
    }
    println!("  speed-up {:.2}x", rates[1] / rates[0]);
}

/// Runs `f(side)` 10 times per side, the `S` sides in turn, and returns per side the medians, in
/// ms, of the `N` timings (seconds) `f` returns, the first run of each side left out.
fn alternate<const S: usize, const N: usize>(
    mut f: impl FnMut(usize) -> [f64; N],
) -> [[f64; N]; S] {
    let mut runs: [Vec<[f64; N]>; S] = std::array::from_fn(|_| Vec::new());
    for rep in 0..10 * S {
        let side = rep % S;
        let seconds = f(side);
        if rep >= S {
            runs[side].push(seconds);
        }
    }
    runs.map(|r| std::array::from_fn(|i| median(r.iter().map(|s| s[i] * 1e3).collect())))
}

/// The two paths of the input gradient on the stride-1 3×3 layers of the pipeline's network
/// (width 16, 28², 512 views) and of the CIFAR one (width 64, 32², 256 views), alternating.
fn input_grad_table() {
    println!("input gradient of 3x3 stride-1 layers, ms (median of 9, the paths alternating):");
    println!(
        "  {:<26} {:>8} {:>13} {:>9} {:>12}",
        "layer", "fold", "convolution", "fold/conv", "chosen"
    );
    let g = ConvGeometry::symmetric(3, 1, 1);
    let layers = [
        (512, 16, 28),
        (512, 32, 14),
        (512, 64, 7),
        (512, 128, 4),
        (256, 64, 32),
        (256, 128, 16),
        (256, 256, 8),
        (256, 512, 4),
    ];
    for (n, c, h) in layers {
        let gy = randn(&[n, c, h, h], 1.0);
        let w = randn(&[c, c, 3, 3], 0.05);
        let op = |path| ConvInputGrad {
            geometry: g,
            h,
            w: h,
            products: Products::F32,
            path: Some(path),
        };
        let paths = [InputGradPath::Fold, InputGradPath::Convolution];
        let [[fold], [conv]] =
            alternate(|i| [time(0, 1, || gy.apply_op2_no_bwd(&w, &op(paths[i])))]);
        let chosen = InputGradPath::choose(g, Products::F32, c, c, h * h);
        println!(
            "  {:<26} {fold:>8.1} {conv:>13.1} {:>8.2}x {:>12}",
            format!("{c}->{c} {h}x{h}, batch {n}"),
            fold / conv,
            format!("{chosen:?}").to_lowercase()
        );
    }
}

/// The three ops of the stride-1 3×3 layers of the CIFAR network (width 64, 32², 256 views)
/// with and without [`simclr_kernels::winograd`], alternating: ms, medians of 9.
fn winograd_table() {
    println!(
        "3x3 stride-1 layers, ms (median of 9, alternating), im2col / winograd (the input \
         gradient by its convolution path):"
    );
    println!(
        "  {:<26} {:>17} {:>17} {:>17}   winograd for",
        "layer", "forward", "input gradient", "kernel gradient"
    );
    let g = ConvGeometry::symmetric(3, 1, 1);
    for (n, c, h) in [(256, 64, 32), (256, 128, 16), (256, 256, 8), (256, 512, 4)] {
        let x = randn(&[n, c, h, h], 1.0);
        let gy = randn(&[n, c, h, h], 1.0);
        let w = randn(&[c, c, 3, 3], 0.05);
        let input_grad = ConvInputGrad {
            geometry: g,
            h,
            w: h,
            products: Products::F32,
            path: Some(InputGradPath::Convolution),
        };
        let was = winograd::enabled();
        let [off, on] = alternate(|side| {
            winograd::set_winograd(side == 1);
            [
                time(0, 1, || conv2d_with(&x, &w, g, ConvBackend::Im2colGemm)),
                time(0, 1, || gy.apply_op2_no_bwd(&w, &input_grad)),
                time(0, 1, || {
                    x.apply_op2_no_bwd(&gy, &ConvKernelGrad(g, Products::F32))
                }),
            ]
        });
        winograd::set_winograd(was);
        let m = [off[0], off[1], off[2], on[0], on[1], on[2]];
        let p = h * h;
        let uses = match (
            winograd::applies(g, Products::F32, c, c, p),
            winograd::applies_to_kernel_grad(g, Products::F32, c, c, p),
        ) {
            (true, true) => "all three",
            (true, false) => "fwd + input",
            _ => "none",
        };
        println!(
            "  {:<26} {:>7.1} / {:>7.1} {:>7.1} / {:>7.1} {:>7.1} / {:>7.1}   {uses}",
            format!("{c}->{c} {h}x{h}, batch {n}"),
            m[0],
            m[3],
            m[1],
            m[4],
            m[2],
            m[5]
        );
    }
}

/// The forward pass of stride-1 3×3 layers of both networks by im2col, F(2×2, 3×3) and
/// F(4×4, 3×3), the three in turn: ms, medians of 9 (`-- tiles`).
fn tiles_table() {
    println!("3x3 stride-1 forward, ms (median of 9, in turn): im2col / F(2x2) / F(4x4)");
    let g = ConvGeometry::symmetric(3, 1, 1);
    let layers = [
        (256, 64, 32),
        (256, 128, 16),
        (256, 256, 8),
        (256, 512, 4),
        (512, 16, 28),
        (512, 32, 14),
        (512, 64, 7),
        (512, 128, 4),
    ];
    for (n, c, h) in layers {
        let xt = randn(&[n, c, h, h], 1.0);
        let wt = randn(&[c, c, 3, 3], 0.05);
        let (x, w) = (xt.flatten_all().unwrap(), wt.flatten_all().unwrap());
        let (x, w) = (x.to_vec1::<f32>().unwrap(), w.to_vec1::<f32>().unwrap());
        let s = winograd::Sizes {
            n,
            c,
            h,
            w: h,
            o: c,
        };
        let was = winograd::enabled();
        let [[a], [b], [d]] = alternate(|side| {
            // im2col with Winograd off, then each tile called directly.
            winograd::set_winograd(side != 0);
            [match side {
                0 => time(0, 1, || conv2d_with(&xt, &wt, g, ConvBackend::Im2colGemm)),
                1 => time(0, 1, || winograd::forward2(s, &x, &w)),
                _ => time(0, 1, || winograd::forward4(s, &x, &w)),
            }]
        });
        winograd::set_winograd(was);
        println!(
            "  {:<26} {a:>7.1} / {b:>7.1} / {d:>7.1}   im2col/F4 {:.2}  F2/F4 {:.2}",
            format!("{c}->{c} {h}x{h}, batch {n}"),
            a / d,
            b / d
        );
    }
}

fn main() {
    println!("threads: {}", rayon::current_num_threads());
    if std::env::args().any(|a| a == "tiles") {
        tiles_table();
        return;
    }
    // `cargo bench -p simclr-models --bench conv -- winograd`: that table only.
    if std::env::args().any(|a| a == "winograd") {
        winograd_table();
        return;
    }
    conv_table();
    input_grad_table();
    winograd_table();
    step_table();
}
