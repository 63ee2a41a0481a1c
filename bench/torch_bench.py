#!/usr/bin/env python3
"""PyTorch baselines for the simclr-rs benchmarks (`cargo xtask bench --compare`).

    python3 bench/torch_bench.py <scenario> [--steps N] [--threads T]
    python3 bench/torch_bench.py pretrain-r50-224 --device cuda --precision bf16 [--batch N]

runs ONE scenario and prints exactly one line of JSON on stdout (everything else goes to
stderr):

    {"scenario": ..., "images_per_s": ..., "seconds_per_step": ..., "peak_rss_mib": ...,
     "threads": ..., "torch": ..., "impl": ..., ...}

The workloads mirror the Rust benches (see bench/README.md):

  pretrain-r18-cifar-32  crates/simclr-pretrain/benches/step.rs: R18, CIFAR stem, width 64,
                         32x32, batch 128 (x2 views): forward, NT-Xent + online probe,
                         backward, LARS step.
  pretrain-r18w16-28     the same at base width 16, 28x28, batch 256 (the pipeline preset).
  pretrain-r50-224       the same with R50 1x (standard stem), 224x224, batch 128 (x2 views),
                         head width 2048, probe over 1000 classes (for the GPU; bench/gpu_check.sh).
  eval-r18-cifar-32      crates/simclr-models/benches/forward.rs: eval forward, batch 64.
  eval-r50-224           eval forward of R50 1x (+ heads, 1000 classes), batch 32, 224x224.
  data-28                crates/simclr-data/benches/data_pipeline.rs: two augmented views per
                         image, Fashion-MNIST 28x28 gray, batch 256, CIFAR recipe (s = 0.5,
                         no blur).
  data-224               two views per image, 375x500 RGB in memory -> 224x224, batch 32,
                         ImageNet recipe (s = 1, blur).
  data-224-jpeg          the same, decoding 375x500 JPEG files (PIL) every time.
  gemm-2048              crates/simclr-kernels/benches/gemm.rs: torch.mm of two 2048x2048
                         matrices, f32 or (--precision bf16) bf16; its rate is GFLOP/s
                         (2 n^3 per product, "unit": "GFLOP/s"), the peak behind the floors
                         of docs/performance.md.
  params                 not a benchmark: parameter counts of the PyTorch models.

A step is one training step / one forward pass / one batch (data scenarios). images_per_s is
batch / median step time over N timed steps after one warm-up step (the upper median for even
N, as simclr-bench computes it); an image of a two-view scenario counts once. fp32 everywhere
by default.

The pretrain scenarios also take --device cuda[:N], --precision bf16 (autocast over f32 master
weights), --batch N, --warmup N (default 3 on a GPU), --tf32 and --channels-last. With any of
these (or pretrain-r50-224) the figure gains device, precision, math, batch, warmup,
fwd_gflop_per_view and gflop_per_image (forward x 3 x 2 views), and on a GPU gpu, peak_gpu_mib,
peak_gpu_reserved_mib, peak_tflops and mfu. Without them the CPU figure is unchanged.
"""

import argparse
import gzip
import json
import math
import os
import random
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".venv")


def _use_venv():
    """Prefer bench/.venv: a full virtual environment (re-exec its interpreter) or a
    `pip install --target bench/.venv/site` folder (appended to sys.path)."""
    py = os.path.join(VENV, "bin", "python")
    inside = os.path.realpath(sys.prefix) == os.path.realpath(VENV)
    if os.path.exists(py) and not inside and not os.environ.get("TORCH_BENCH_NO_VENV"):
        os.environ["TORCH_BENCH_NO_VENV"] = "1"  # no loops if the venv python is odd
        os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])
    site = os.path.join(VENV, "site")
    if os.path.isdir(site) and site not in sys.path:
        sys.path.append(site)  # after the system's packages: torch stays the system one


_use_venv()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Measurement (the same rules as crates/simclr-bench)
# ------------------------------------------------------------------------------------------

def reset_peak_window():
    """Like simclr_bench::reset_peak_rss: VmHWM restarts at the current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def vm_hwm_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if v else float("nan")  # upper median, as simclr_bench::median


def time_steps(warmup, runs, step, sync=None):
    """`sync` (torch.cuda.synchronize on a GPU) runs before the clock starts and before it is
    read, so that a step's time covers all of its device work."""
    reset_peak_window()
    times = []
    for i in range(warmup + runs):
        if sync is not None:
            sync()
        t = time.perf_counter()
        step(i)
        if sync is not None:
            sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    log("step times (s): " + ", ".join(f"{t:.4f}" for t in times))
    return median(times), vm_hwm_mib()


# ------------------------------------------------------------------------------------------
# The SimCLRv2 model (crates/simclr-models): ResNet + projection head + supervised head
# ------------------------------------------------------------------------------------------

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch's momentum = 1 - batch_norm_decay (0.9)
BLOCKS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]),
          50: ("bottleneck", [3, 4, 6, 3]), 101: ("bottleneck", [3, 4, 23, 3]),
          152: ("bottleneck", [3, 8, 36, 3])}


def conv(cin, cout, k, stride):
    # No bias. TF's fixed padding at stride > 1 and SAME at stride 1 are both k // 2 on every
    # side for the odd kernels used here.
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


def bn2d(c, zero_gamma=False):
    b = nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)
    if zero_gamma:
        nn.init.zeros_(b.weight)
    return b


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, f, stride, projection):
        super().__init__()
        cout = f
        # The first block of every group has a projection shortcut, even when cin == cout
        # and stride == 1 (as the official code and resnet.rs do).
        self.shortcut = nn.Sequential(conv(cin, cout, 1, stride), bn2d(cout)) if projection else None
        self.conv1, self.bn1 = conv(cin, f, 3, stride), bn2d(f)
        self.conv2, self.bn2 = conv(f, f, 3, 1), bn2d(f, zero_gamma=True)

    def forward(self, x):
        sc = x if self.shortcut is None else self.shortcut(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + sc, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, f, stride, projection):
        super().__init__()
        cout = 4 * f
        self.shortcut = nn.Sequential(conv(cin, cout, 1, stride), bn2d(cout)) if projection else None
        self.conv1, self.bn1 = conv(cin, f, 1, 1), bn2d(f)
        self.conv2, self.bn2 = conv(f, f, 3, stride), bn2d(f)  # stride on the 3x3 ("v1.5")
        self.conv3, self.bn3 = conv(f, cout, 1, 1), bn2d(cout, zero_gamma=True)

    def forward(self, x):
        sc = x if self.shortcut is None else self.shortcut(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(y + sc, inplace=True)


class ResNet(nn.Module):
    def __init__(self, depth, base_width=64, width_multiplier=1, cifar_stem=False):
        super().__init__()
        kind, per_stage = BLOCKS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        c0 = base_width * width_multiplier
        if cifar_stem:  # conv 3x3/s1, BN-ReLU, no max-pool
            self.stem = nn.Sequential(conv(3, c0, 3, 1), bn2d(c0), nn.ReLU(inplace=True))
        else:  # conv 7x7/s2, BN-ReLU, max-pool 3x3/s2
            # TF "SAME" max-pool pads (0, 1) on even sides where PyTorch pads (1, 1): the same
            # output size and cost, windows shifted by one pixel.
            self.stem = nn.Sequential(conv(3, c0, 7, 2), bn2d(c0), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, padding=1))
        groups, cin = [], c0
        for stage, n in enumerate(per_stage):
            f = c0 * (1 << stage)
            blocks = []
            for b in range(n):
                stride = (1 if stage == 0 else 2) if b == 0 else 1
                blocks.append(block(cin, f, stride, projection=(b == 0)))
                cin = f * block.expansion
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # VarianceScaling(1.0, fan_in, truncated normal)
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                nn.init.trunc_normal_(m.weight, std=1.0 / math.sqrt(fan_in) / 0.8796,
                                      a=-2.0 / math.sqrt(fan_in) / 0.8796,
                                      b=2.0 / math.sqrt(fan_in) / 0.8796)

    def forward(self, x):
        return self.groups(self.stem(x)).mean(dim=(2, 3))  # final_avg_pool


class BatchNormNoBeta(nn.Module):
    """BN with gamma and no beta (the last projection-head layer)."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, None,
                            self.training, BN_MOMENTUM, BN_EPS)


class ProjectionHead(nn.Module):
    """`nonlinear` mode: num_proj_layers dense (no bias) + BN; ReLU and BN beta on all but
    the last, which maps to proj_out_dim."""

    def __init__(self, d, proj_out_dim=128, num_layers=3):
        super().__init__()
        self.dense, self.bn, self.relu = nn.ModuleList(), nn.ModuleList(), []
        for j in range(num_layers):
            last = j + 1 == num_layers
            out = proj_out_dim if last else d
            lin = nn.Linear(d, out, bias=False)
            nn.init.normal_(lin.weight, std=0.01)
            self.dense.append(lin)
            self.bn.append(BatchNormNoBeta(out) if last else
                           nn.BatchNorm1d(out, eps=BN_EPS, momentum=BN_MOMENTUM))
            self.relu.append(not last)

    def forward(self, h):
        hiddens = [h]
        y = h
        for dense, bn, relu in zip(self.dense, self.bn, self.relu):
            y = bn(dense(y))
            if relu:
                y = F.relu(y)
            hiddens.append(y)
        return hiddens


class SimclrModel(nn.Module):
    def __init__(self, depth, base_width=64, cifar_stem=False, num_classes=10,
                 ft_proj_selector=0):
        super().__init__()
        self.resnet = ResNet(depth, base_width, 1, cifar_stem)
        d = self.resnet.feature_dim
        self.projection_head = ProjectionHead(d)
        n = len(self.projection_head.dense) + 1
        self.sel = ft_proj_selector + n if ft_proj_selector < 0 else ft_proj_selector
        sup_in = d if self.sel < n - 1 else 128  # hiddens[i] width, as ModelConfig::hidden_dim
        self.head_supervised = nn.Linear(sup_in, num_classes, bias=True)
        nn.init.normal_(self.head_supervised.weight, std=0.01)
        nn.init.zeros_(self.head_supervised.bias)

    def forward(self, x, stop_gradient_supervised_input=True):
        h = self.resnet(x)
        hiddens = self.projection_head(h)
        sup_in = hiddens[self.sel]
        if stop_gradient_supervised_input:
            sup_in = sup_in.detach()
        return h, hiddens[-1], self.head_supervised(sup_in)


def param_groups(model):
    """(name, parameter, group) with simclr_models::param_group's rules."""
    out = []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("head_supervised."):
            group = "bias" if leaf == "bias" else "supervised_head"
        elif p.ndim == 1:  # BN gamma / beta (no other 1-d parameter exists here)
            group = "batch_norm"
        else:
            group = "adapted"  # conv kernels and projection-head dense kernels
        out.append((name, p, group))
    return out


def count_parameters(model):
    c = {"resnet": 0, "resnet_stats": 0, "projection_head": 0, "projection_head_stats": 0,
         "supervised_head": 0}
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        c[part if part != "head_supervised" else "supervised_head"] += p.numel()
    for name, b in model.named_buffers():
        if name.endswith("running_mean") or name.endswith("running_var"):
            c[name.split(".", 1)[0] + "_stats"] += b.numel()
    c["trainable"] = c["resnet"] + c["projection_head"] + c["supervised_head"]
    c["encoder_variables"] = c["resnet"] + c["resnet_stats"]
    return c


# ------------------------------------------------------------------------------------------
# NT-Xent (crates/simclr-pretrain/src/objective.rs, one replica) and LARS (optim/lars.rs)
# ------------------------------------------------------------------------------------------

LARGE_NUM = 1e9
TEMPERATURE = 0.1  # NtXentConfig::default()
HIDDEN_NORM = True


def nt_xent(hidden, temperature=TEMPERATURE, hidden_norm=HIDDEN_NORM):
    n = hidden.shape[0] // 2
    h = hidden
    if hidden_norm:  # TF l2_normalize: x / sqrt(max(sum x^2, 1e-12))
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True).clamp_min(1e-12))
    h1, h2 = h[:n], h[n:]
    labels = torch.arange(n, device=h.device)
    mask = F.one_hot(labels, n).to(h.dtype) * LARGE_NUM
    inv_t = 1.0 / temperature
    ab = h1 @ h2.t() * inv_t
    aa = h1 @ h1.t() * inv_t - mask
    ba = h2 @ h1.t() * inv_t
    bb = h2 @ h2.t() * inv_t - mask
    loss_a = F.cross_entropy(torch.cat([ab, aa], 1), labels, reduction="none")
    loss_b = F.cross_entropy(torch.cat([ba, bb], 1), labels, reduction="none")
    loss = (loss_a + loss_b).mean()  # the official "2x" NT-Xent
    # Metrics from logits_ab, read on the host as the Rust stage does.
    with torch.no_grad():
        lab = ab.detach()
        acc = (lab.argmax(-1) == labels).double().mean().item()
        logp = F.log_softmax(lab.double(), -1)
        entropy = -(logp.exp() * logp).sum(-1).mean().item()
    return loss, acc, entropy


class Lars:
    """The official TF2 LARS (classic momentum, lr inside the buffer), with OptimizerSettings
    defaults: momentum 0.9, weight decay 1e-6, eeta 0.001, no Nesterov. Adapted groups (conv
    and projection-head kernels): decay + trust ratio; BN and biases: neither; the supervised
    head kernel: decay (its L2 is in the official loss), no trust ratio."""

    def __init__(self, groups, momentum=0.9, weight_decay=1e-6, eeta=0.001):
        self.items = [(p, g) for _, p, g in groups]
        self.bufs = [torch.zeros_like(p) for p, _ in self.items]
        self.m, self.wd, self.eeta = momentum, weight_decay, eeta

    @torch.no_grad()
    def step(self, lr):
        wd_terms = []
        for (p, group), buf in zip(self.items, self.bufs):
            if p.grad is None:
                continue
            g = p.grad
            decay = group in ("adapted", "supervised_head") and self.wd != 0.0
            if decay:
                wd_terms.append(p.pow(2).sum() * (0.5 * self.wd))
                g = g.add(p, alpha=self.wd)
            if group == "adapted":
                w_norm, g_norm = p.norm(), g.norm()
                trust = torch.where((w_norm > 0) & (g_norm > 0), self.eeta * w_norm / g_norm,
                                    torch.ones_like(w_norm))
                scaled = g * (trust * lr)
            else:
                scaled = g * lr
            buf.mul_(self.m).add_(scaled)
            p.sub_(buf)
        return sum(wd_terms) if wd_terms else torch.zeros(())


# ------------------------------------------------------------------------------------------
# Model scenarios
# ------------------------------------------------------------------------------------------

class Run:
    """Where and how a model scenario runs: --device, --precision, --warmup, --tf32,
    --channels-last. The defaults are the CPU fp32 runs of `cargo xtask bench --compare`."""

    def __init__(self, device="cpu", precision="f32", warmup=1, tf32=False, channels_last=False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.bf16 = precision == "bf16"
        self.precision = precision
        self.warmup = warmup
        self.tf32 = tf32
        self.channels_last = channels_last
        if self.cuda:
            # f32 means fp32 arithmetic unless --tf32: PyTorch's default lets cuDNN convolutions
            # use TF32, which our f32 path (parity tolerance 1e-4) does not.
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32

    def sync(self):
        return torch.cuda.synchronize if self.cuda else None

    def math(self):
        """The arithmetic of the products, which picks the peak for MFU."""
        if self.bf16:
            return "bf16"
        return "tf32" if (self.cuda and self.tf32) else "fp32"

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.bf16)

    def no_autocast(self):
        return torch.autocast(device_type=self.device.type, enabled=False)


def forward_gflop_per_view(depth, base_width, side, num_classes):
    """Forward FLOPs (2 x multiply-adds) of one side x side image through the encoder and both
    heads, counted by hooks on every Conv2d and Linear of a shape-only (meta) model. BN, ReLU,
    pooling and the loss are left out (well under 1% here)."""
    macs = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            k = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            k = m.in_features
        macs[0] += out.numel() // out.shape[0] * k

    with torch.device("meta"):
        model = SimclrModel(depth, base_width, cifar_stem=side <= 32, num_classes=num_classes)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.register_forward_hook(hook)
        model.eval()
        with torch.no_grad():
            model(torch.empty(1, 3, side, side), stop_gradient_supervised_input=False)
    return 2.0 * macs[0] / 1e9


def pretrain_scenario(base_width, side, batch, steps, depth=18, num_classes=10, run=None):
    extended = run is not None  # None: the CPU figure of `cargo xtask bench --compare`, as before
    run = run or Run()
    dev = run.device
    model = SimclrModel(depth, base_width, cifar_stem=side <= 32, num_classes=num_classes)
    model.to(dev)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    opt = Lars(param_groups(model))
    gen = torch.Generator().manual_seed(0)
    views = [torch.rand(batch, 3, side, side, generator=gen).to(dev) for _ in range(2)]
    labels = torch.arange(batch, device=dev) % num_classes
    x_labels = torch.cat([labels, labels])

    def step(i):
        for p in model.parameters():
            p.grad = None
        x = torch.cat(views, 0)  # the two views stacked before the encoder (stage.rs)
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # bf16: autocast products over f32 master weights (BN runs in f32 under autocast); the
        # losses in f32 as ours computes them.
        with run.autocast():
            _, z, logits = model(x)
            with run.no_autocast():
                loss, acc, ent = nt_xent(z.float())
                sup = F.cross_entropy(logits.float(), x_labels)
        sup_acc = (logits.argmax(-1) == x_labels).double().mean().item()
        total = loss + sup
        contrast_loss, sup_loss = loss.item(), sup.item()
        total.backward()
        opt.step(0.1)
        if i == 0:
            log(f"warm-up step: contrast_loss {contrast_loss:.4f} (2 ln(2N-1) = "
                f"{2 * math.log(2 * batch - 1):.4f}), contrast_acc {acc:.3f}, entropy {ent:.3f}, "
                f"supervised_loss {sup_loss:.4f}, supervised_acc {sup_acc:.3f}")

    if run.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t, window = time_steps(run.warmup, steps, step, run.sync())
    extra = {"impl": "torch.nn"}
    if extended:
        extra.update(gpu_extra(run, depth, base_width, side, num_classes, batch, t))
    return batch, t, window, extra


# Dense peak rates of an H100 SXM (the H200 has the same compute), TFLOP/s.
PEAK_TFLOPS = {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}


def gpu_extra(run, depth, base_width, side, num_classes, batch, t):
    """The GPU fields of a training figure: precision, peak device memory, analytic FLOPs per
    image (forward per view x 3 for forward + backward, x 2 views) and MFU."""
    fwd = forward_gflop_per_view(depth, base_width, side, num_classes)
    per_image = fwd * 3 * 2
    log(f"forward {fwd:.3f} GFLOP per {side}x{side} view; {per_image:.2f} GFLOP per image "
        f"(2 views, forward + backward)")
    out = {"device": str(run.device), "precision": run.precision, "math": run.math(),
           "batch": batch, "warmup": run.warmup, "fwd_gflop_per_view": fwd,
           "gflop_per_image": per_image}
    if run.cuda:
        out["gpu"] = torch.cuda.get_device_name(run.device)
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(run.device) / 2**20
        out["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved(run.device) / 2**20
        out["channels_last"] = run.channels_last
        peak = PEAK_TFLOPS[run.math()]
        out["peak_tflops"] = peak
        out["mfu"] = batch / t * per_image / (peak * 1e3)
    return out


def gemm_scenario(side, steps, precision):
    """torch.mm on two side x side matrices: (2 side^3 / 1e9 GFLOP, t, window, extra). The
    values match the Rust bench's: positive, modest, no subnormals."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    idx = torch.arange(side * side, dtype=torch.int64)
    a = (((idx * 7 + 13) % 97).float() / 97.0 + 0.5).reshape(side, side).to(dtype)
    b = (((idx * 7 + 26) % 97).float() / 97.0 + 0.5).reshape(side, side).to(dtype)
    out = {}

    def step(i):
        out["c"] = torch.mm(a, b)

    t, window = time_steps(1, steps, step)
    assert bool((out["c"] > 0).all()), "product not computed"
    return 2.0 * side ** 3 / 1e9, t, window, {"impl": f"torch.mm {precision}", "unit": "GFLOP/s"}


def eval_scenario(depth, side, batch, steps, num_classes):
    model = SimclrModel(depth, 64, cifar_stem=side <= 32, num_classes=num_classes)
    model.eval()
    x = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0))

    def step(i):
        with torch.no_grad():
            h, z, logits = model(x)
        if i == 0:
            log(f"warm-up pass: final_avg_pool {tuple(h.shape)}, proj_head_output "
                f"{tuple(z.shape)}, logits {tuple(logits.shape)}, finite {bool(torch.isfinite(logits).all())}")

    t, window = time_steps(1, steps, step)
    return batch, t, window, {"impl": "torch.nn"}


# ------------------------------------------------------------------------------------------
# Data scenarios (crates/simclr-data/src/augment.rs recipe, torchvision or plain torch ops)
# ------------------------------------------------------------------------------------------

FASHION = os.path.join(os.path.dirname(HERE), "data", "fashion-mnist-subset",
                       "train-images-idx3-ubyte.gz")


def fashion_images(n):
    """The first n images of the committed Fashion-MNIST subset ([n, 28, 28] uint8), or random
    uint8 images of that size when the file is missing."""
    try:
        with gzip.open(FASHION, "rb") as f:
            raw = f.read()
        count, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
        imgs = np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)
        return imgs[:n].copy(), "fashion-mnist-subset"
    except OSError:
        log(f"{FASHION} not found: random 28x28 images instead")
        return np.random.default_rng(0).integers(0, 256, (n, 28, 28), np.uint8), "random"


def large_images(src):
    """As data_pipeline.rs's large_images: 375x500 RGB, nearest upscale + tint."""
    h, w = 375, 500
    ys = np.arange(h) * 28 // h
    xs = np.arange(w) * 28 // w
    out = []
    for s in src:
        v = s[ys][:, xs].astype(np.uint32)
        out.append(np.stack([v, v * 3 // 4 + 40, 255 - v], -1).astype(np.uint8))
    return out


def blur_kernel_size(side):
    return 2 * (side // 10 // 2) + 1  # gaussian_kernel: radius = (side / 10) / 2


def separable_blur(x, sigma, side):
    """Our blur: separable Gaussian, zero padding ("SAME"), then clip. x: [n, 3, s, s]."""
    k = blur_kernel_size(side)
    r = k // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    w = torch.exp(-(t * t) / (2.0 * sigma * sigma))
    w = w / w.sum()
    c = x.shape[1]
    x = F.conv2d(x, w.view(1, 1, 1, k).expand(c, 1, 1, k), padding=(0, r), groups=c)
    x = F.conv2d(x, w.view(1, 1, k, 1).expand(c, 1, k, 1), padding=(r, 0), groups=c)
    return x.clamp_(0.0, 1.0)


class TorchvisionAugment:
    """One view with torchvision.transforms.v2: RandomResizedCrop (bicubic, no antialias, as
    TF's resize) on the uint8 image, flip, float conversion, colour jitter p 0.8, grayscale
    p 0.2. Blur is applied per view-batch by `blur_batch`."""

    def __init__(self, size, strength, gray_source):
        from torchvision.transforms import v2
        import torchvision.transforms.v2.functional as TF
        self.TF = TF
        s = strength
        # Rust skips saturation and hue on single-channel sources (they are no-ops there);
        # torchvision skips a jitter component whose range is 0.
        sat, hue = (0.0, 0.0) if gray_source else (0.8 * s, 0.2 * s)
        self.t = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                 interpolation=v2.InterpolationMode.BICUBIC, antialias=False),
            v2.RandomHorizontalFlip(0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, sat, hue)], p=0.8),
            v2.RandomGrayscale(0.2),
        ])

    def __call__(self, chw_u8):
        return self.t(chw_u8).clamp(0.0, 1.0)  # the final clip (out of place: may be a view)

    def blur(self, x, sigma, side, mode):
        if mode == "separable":
            return separable_blur(x, sigma, side)
        k = blur_kernel_size(side)
        return self.TF.gaussian_blur(x, [k, k], [sigma, sigma])  # 2-D kernel, reflect padding


class TorchOpsAugment:
    """The same recipe with plain torch ops (used when torchvision cannot be imported)."""

    def __init__(self, size, strength, gray_source):
        self.size, self.s, self.gray = size, strength, gray_source

    @staticmethod
    def crop_params(h, w):  # torchvision's RandomResizedCrop.get_params
        area = h * w
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * random.uniform(0.08, 1.0)
            ar = math.exp(random.uniform(*log_ratio))
            cw = int(round(math.sqrt(target * ar)))
            ch = int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                return random.randint(0, h - ch), random.randint(0, w - cw), ch, cw
        ch, cw = min(h, w), min(h, w)
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    @staticmethod
    def gray_of(x):
        return (0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)

    @staticmethod
    def hue_shift(x, delta):
        r, g, b = x[0], x[1], x[2]
        maxc, _ = x.max(0)
        minc, _ = x.min(0)
        v = maxc
        cr = maxc - minc
        s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
        crd = torch.where(cr == 0, torch.ones_like(cr), cr)
        rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
        hr = (maxc == r) * (bc - gc)
        hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
        hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
        h = torch.fmod((hr + hg + hb) / 6.0 + 1.0 + delta, 1.0)
        i = torch.floor(h * 6.0)
        f = h * 6.0 - i
        i = i.to(torch.int64) % 6
        p = (v * (1.0 - s)).clamp(0, 1)
        q = (v * (1.0 - s * f)).clamp(0, 1)
        t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
        mask = i.unsqueeze(0) == torch.arange(6).view(-1, 1, 1)
        table = torch.stack([torch.stack(c) for c in
                             ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])
        return torch.einsum("...ijk,...xijk->...xjk", mask.to(x.dtype), table)

    def __call__(self, chw_u8):
        _, h, w = chw_u8.shape
        y0, x0, ch, cw = self.crop_params(h, w)
        crop = chw_u8[:, y0:y0 + ch, x0:x0 + cw].unsqueeze(0).float().div_(255.0)
        x = F.interpolate(crop, size=(self.size, self.size), mode="bicubic",
                          align_corners=False)[0]
        if random.random() < 0.5:
            x = x.flip(-1)
        b = c = sat = 0.8 * self.s
        hue = 0.2 * self.s
        if random.random() < 0.8:
            for op in random.sample(range(4), 4):
                if op == 0:
                    x = x * random.uniform(max(0.0, 1 - b), 1 + b)
                elif op == 1:
                    m = x.mean(dim=(1, 2), keepdim=True)
                    x = (x - m) * random.uniform(1 - c, 1 + c) + m
                elif op == 2:
                    f = random.uniform(1 - sat, 1 + sat)
                    if not self.gray:
                        gr = self.gray_of(x)
                        x = gr + (x - gr) * f
                else:
                    d = random.uniform(-hue, hue)
                    if not self.gray:
                        x = self.hue_shift(x, d)
                x = x.clamp(0.0, 1.0)
        if random.random() < 0.2:
            x = self.gray_of(x).expand(3, -1, -1).contiguous()
        return x.clamp_(0.0, 1.0)

    def blur(self, x, sigma, side, mode):
        return separable_blur(x, sigma, side)


def make_augment(size, strength, gray_source, impl="auto"):
    if impl == "torch-ops":
        return TorchOpsAugment(size, strength, gray_source), "torch-ops"
    try:
        return TorchvisionAugment(size, strength, gray_source), "torchvision"
    except Exception as e:  # ImportError, or a torchvision that does not match torch
        if impl == "torchvision":
            raise
        log(f"torchvision transforms unavailable ({type(e).__name__}: {e}); using torch ops")
        return TorchOpsAugment(size, strength, gray_source), "torch-ops"


def data_scenario(name, steps, blur_mode, impl_choice):
    if name == "data-28":
        size, batch, strength, blur = 28, 256, 0.5, False  # AugmentConfig::pretrain(28)
        pool_n = 512
        src, source = fashion_images(pool_n)
        images = list(src)  # [28, 28] gray; replicated to 3 channels per view, as Rust does
        gray = True
    else:
        size, batch, strength, blur = 224, 32, 1.0, True  # AugmentConfig::pretrain(224)
        src, source = fashion_images(9 * 32)  # 288 images, as the Rust bench
        images = large_images(src)
        source = f"375x500 RGB from {source}"
        gray = False
    jpeg_dir = None
    if name == "data-224-jpeg":
        from PIL import Image
        jpeg_dir = tempfile.TemporaryDirectory()
        paths = []
        for i, im in enumerate(images):
            p = os.path.join(jpeg_dir.name, f"{i}.JPEG")
            Image.fromarray(im).save(p, quality=75)  # the `image` crate's default quality
            paths.append(p)
        images = paths
        source += ", JPEG files (PIL decode)"
    aug, impl = make_augment(size, strength, gray, impl_choice)
    random.seed(0)
    torch.manual_seed(0)
    n = len(images)

    def load(i):
        im = images[i % n]
        if jpeg_dir is not None:
            from PIL import Image
            with Image.open(im) as f:
                im = np.asarray(f.convert("RGB"))
        t = torch.from_numpy(im)
        if t.ndim == 2:
            return t.unsqueeze(0).expand(3, -1, -1)  # gray -> RGB
        return t.permute(2, 0, 1)  # HWC -> CHW (a view)

    def step(i):
        idx = range(i * batch, (i + 1) * batch)
        imgs = [load(j) for j in idx]
        views = []
        for _ in range(2):
            x = torch.stack([aug(im) for im in imgs])
            if blur:  # batch_random_blur: one sigma per view-batch, each image with p 0.5
                sigma = random.uniform(0.1, 2.0)
                sel = torch.tensor([random.random() < 0.5 for _ in range(batch)])
                if sel.any():
                    x[sel] = aug.blur(x[sel], sigma, size, blur_mode)
            views.append(x)
        if i == 0:
            v = views[0]
            log(f"warm-up batch: 2 x {tuple(v.shape)} {v.dtype}, range [{v.min():.3f}, "
                f"{v.max():.3f}], mean {v.mean():.3f}; source {source}; impl {impl}"
                + (f"; blur {blur_mode if impl == 'torchvision' else 'separable'}" if blur else ""))

    t, window = time_steps(1, steps, step)
    extra = {"impl": impl}
    if blur:
        extra["blur"] = blur_mode if impl == "torchvision" else "separable"
    if jpeg_dir is not None:
        jpeg_dir.cleanup()
    return batch, t, window, extra


# ------------------------------------------------------------------------------------------

SCENARIOS = ["pretrain-r18-cifar-32", "pretrain-r18w16-28", "pretrain-r50-224",
             "eval-r18-cifar-32", "eval-r50-224", "data-28", "data-224", "data-224-jpeg",
             "gemm-2048", "params"]
# The training scenarios: (depth, base width, side, default batch, classes).
PRETRAIN = {"pretrain-r18-cifar-32": (18, 64, 32, 128, 10),
            "pretrain-r18w16-28": (18, 16, 28, 256, 10),
            "pretrain-r50-224": (50, 64, 224, 128, 1000)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=SCENARIOS)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (default 2; 1 for the data scenarios)")
    ap.add_argument("--blur", choices=["torchvision", "separable"], default="torchvision",
                    help="data-224 blur with torchvision (2-D kernel, reflect padding) or "
                         "separable with zero padding as ours (default torchvision)")
    ap.add_argument("--impl", choices=["auto", "torchvision", "torch-ops"], default="auto",
                    help="data scenarios: torchvision.transforms.v2, or plain torch ops "
                         "(auto: torchvision when it imports)")
    ap.add_argument("--device", default="cpu",
                    help="pretrain scenarios: cpu (default), cuda or cuda:N")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                    help="pretrain scenarios: f32 (default), or bf16 autocast over f32 master "
                         "weights (BN and the losses in f32)")
    ap.add_argument("--batch", type=int, default=None,
                    help="pretrain scenarios: images per view (default: the scenario's)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps before the timed ones (default 1; 3 on a GPU)")
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA f32: let cuDNN and cuBLAS use TF32 (PyTorch's conv default); "
                         "off by default, so f32 is fp32 arithmetic as ours")
    ap.add_argument("--channels-last", action="store_true",
                    help="CUDA: NHWC activations and weights (off by default)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    on_gpu = args.device != "cpu"
    if args.scenario not in PRETRAIN and (on_gpu or args.batch is not None or args.tf32
                                          or args.channels_last):
        ap.error("--device/--batch/--tf32/--channels-last apply to the pretrain-* scenarios only")
    if args.scenario not in PRETRAIN and args.scenario != "gemm-2048" and args.precision != "f32":
        ap.error("--precision applies to the pretrain-* and gemm-2048 scenarios only")
    if on_gpu and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.batch is not None and args.batch < 2:
        ap.error("--batch must be >= 2")
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    if warmup < 1:
        ap.error("--warmup must be >= 1")
    name = args.scenario
    threads = args.threads or (1 if name.startswith("data-") else 2)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)

    if name == "params":
        counts = {
            "r18_cifar_w64": count_parameters(SimclrModel(18, 64, cifar_stem=True, num_classes=10)),
            "r18_cifar_w16": count_parameters(SimclrModel(18, 16, cifar_stem=True, num_classes=10)),
            "r50_1x": count_parameters(SimclrModel(50, 64, cifar_stem=False, num_classes=1000)),
        }
        print(json.dumps({"scenario": "params", "torch": torch.__version__, **counts}), flush=True)
        return

    if name in PRETRAIN:
        depth, width, side, batch, classes = PRETRAIN[name]
        plain = (not on_gpu and args.precision == "f32" and args.batch is None
                 and args.warmup is None and name != "pretrain-r50-224")
        run = None if plain else Run(args.device, args.precision, warmup, args.tf32,
                                     args.channels_last)
        batch, t, window, extra = pretrain_scenario(width, side, args.batch or batch,
                                                    args.steps, depth, classes, run)
    elif name == "gemm-2048":
        batch, t, window, extra = gemm_scenario(2048, args.steps, args.precision)
    elif name == "eval-r18-cifar-32":
        batch, t, window, extra = eval_scenario(18, 32, 64, args.steps, 10)
    elif name == "eval-r50-224":
        batch, t, window, extra = eval_scenario(50, 224, 32, args.steps, 1000)
    else:
        batch, t, window, extra = data_scenario(name, args.steps, args.blur, args.impl)

    figure = {
        "scenario": name,
        "images_per_s": batch / t,
        "seconds_per_step": t,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "threads": threads,
        "torch": torch.__version__,
        # VmHWM since just before the warm-up step, as simclr-bench measures the Rust side.
        "peak_rss_window_mib": window,
        **extra,
    }
    print(json.dumps(figure), flush=True)


if __name__ == "__main__":
    main()
