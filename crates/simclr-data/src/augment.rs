//! SimCLR augmentations, as the official tf2 `data_util.py` applies them.
//!
//! Pretraining view: Inception crop (TF's `sample_distorted_bounding_box`: area 0.08–1, aspect
//! 3/4–4/3, min_object_covered 0.1, 100 attempts, whole image on failure) + bicubic resize, flip
//! p 0.5, colour distortion of strength s (p 0.8: brightness, contrast, saturation, hue in random
//! order, clipped after each), grayscale p 0.2, final clip. Gaussian blur is a batch operation in
//! the official code (one σ per view-batch), so it lives in [`blur_batch_chw`] and the loader
//! calls it. Fine-tuning view: crop + flip only. Evaluation: aspect-preserving 0.875 centre
//! crop + bicubic resize, none at ≤ 32 px. Inputs stay in [0, 1]: no mean/std normalisation.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::image::UNIT;
use crate::{FImage, Image};

/// Images at or below this side use the CIFAR recipe (s = 0.5, no blur, no test crop).
pub const SMALL_IMAGE: usize = 32;
pub const CROP_PROPORTION: f64 = 0.875;

/// How one view is made from an image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    /// Output side (square), `image_size` in the official flags.
    pub image_size: usize,
    /// Inception crop + resize; `false` resizes the whole image.
    pub crop: bool,
    pub flip: bool,
    /// `color_jitter_strength`; 0 switches colour distortion (and grayscale) off.
    pub color_jitter_strength: f32,
    /// `use_blur`: Gaussian blur at p 0.5, applied per batch by the loader.
    pub use_blur: bool,
    /// The smallest crop area, as a fraction of the image (the official 0.08). Not an official
    /// flag: a milder crop suits 28×28 images, whose objects fill the frame (`docs/results.md`).
    #[serde(
        default = "default_crop_min_area",
        skip_serializing_if = "is_default_crop_min_area"
    )]
    pub crop_min_area: f32,
}

/// The official Inception crop's smallest area (TF's `area_range=(0.08, 1.0)`).
pub const CROP_MIN_AREA: f32 = 0.08;

fn default_crop_min_area() -> f32 {
    CROP_MIN_AREA
}

// Keeps the serialised form (and so the pipeline's stage hashes) of configs that leave it alone.
fn is_default_crop_min_area(a: &f32) -> bool {
    *a == CROP_MIN_AREA
}

impl AugmentConfig {
    /// The pretraining recipe: s = 1 with blur for large images, s = 0.5 without blur at ≤ 32 px.
    pub fn pretrain(image_size: usize) -> Self {
        let small = image_size <= SMALL_IMAGE;
        AugmentConfig {
            image_size,
            crop: true,
            flip: true,
            color_jitter_strength: if small { 0.5 } else { 1.0 },
            use_blur: !small,
            crop_min_area: CROP_MIN_AREA,
        }
    }

    /// Fine-tuning and distillation: crop + flip only.
    pub fn finetune(image_size: usize) -> Self {
        AugmentConfig {
            image_size,
            crop: true,
            flip: true,
            color_jitter_strength: 0.0,
            use_blur: false,
            crop_min_area: CROP_MIN_AREA,
        }
    }
}

/// The crop TF's `sample_distorted_bounding_box` picks: `(y, x, height, width)` in pixels.
///
/// Per attempt: aspect ratio r ~ U[3/4, 4/3] and a minimum area a ~ U[0.08, 1]; the height is
/// uniform over the integers between √(a·A/r) and √(A/r) (shrunk so the width fits), the width
/// `round(h·r)`; the crop must also cover 10 % of the image (`min_object_covered`). The offset is
/// uniform over `[0, H − h)` (TF never picks the last position). After 100 failures: whole image.
pub fn sample_crop(
    height: usize,
    width: usize,
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    sample_crop_area(height, width, CROP_MIN_AREA, rng)
}

/// [`sample_crop`] with the smallest area `min_area` instead of 0.08.
pub fn sample_crop_area(
    height: usize,
    width: usize,
    min_area: f32,
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let area = (min_area, 1.0f32);
    const MIN_COVERED: f32 = 0.1;
    let image_aspect = width as f32 / height as f32;
    let (ar_lo, ar_hi) = (0.75 * image_aspect, 4.0 / 3.0 * image_aspect);
    let total = (height * width) as f32;
    for _ in 0..100 {
        let aspect: f32 = rng.random::<f32>() * (ar_hi - ar_lo) + ar_lo;
        let min_rel: f32 = rng.random::<f32>() * (area.1 - area.0) + area.0;
        if let Some((h, w)) = random_crop_size(height, width, min_rel, area.1, aspect, rng) {
            if (h * w) as f32 / total >= MIN_COVERED {
                let y = if h < height {
                    rng.random_range(0..height - h)
                } else {
                    0
                };
                let x = if w < width {
                    rng.random_range(0..width - w)
                } else {
                    0
                };
                return (y, x, h, w);
            }
        }
    }
    (0, 0, height, width)
}

/// TF's `GenerateRandomCrop`: the crop size for one attempt, or `None` when it fails.
fn random_crop_size(
    height: usize,
    width: usize,
    min_rel: f32,
    max_rel: f32,
    aspect: f32,
    rng: &mut impl Rng,
) -> Option<(usize, usize)> {
    let rint = |v: f32| v.round_ties_even() as i64;
    let (ih, iw) = (height as i64, width as i64);
    let min_area = min_rel * (height * width) as f32;
    let max_area = max_rel * (height * width) as f32;
    let mut h = rint((min_area / aspect).sqrt());
    let mut max_h = rint((max_area / aspect).sqrt());
    if rint(max_h as f32 * aspect) > iw {
        max_h = ((iw as f32 + 0.5 - 1e-7) / aspect) as i64;
        if rint(max_h as f32 * aspect) > iw {
            max_h -= 1;
        }
    }
    max_h = max_h.min(ih);
    if h >= max_h {
        h = max_h;
    }
    if h < max_h {
        h += rng.random_range(0..=(max_h - h));
    }
    let mut w = rint(h as f32 * aspect);
    let mut area = (w * h) as f32;
    if area < min_area {
        h += 1;
        w = rint(h as f32 * aspect);
        area = (w * h) as f32;
    }
    if area > max_area {
        h -= 1;
        w = rint(h as f32 * aspect);
        area = (w * h) as f32;
    }
    if area < min_area || area > max_area || w > iw || h > ih || w <= 0 || h <= 0 {
        return None;
    }
    Some((h as usize, w as usize))
}

/// Taps and weights of TF2's bicubic resize (Keys a = −0.5, half-pixel centres, out-of-range
/// taps dropped and the rest renormalised) for one axis: for each output index, the first of
/// its four consecutive input taps (from −2 to `in_size − 2`) and their weights, 0 for a tap
/// outside the input.
fn cubic_taps(in_size: usize, out_size: usize) -> Vec<(i64, [f32; 4])> {
    const A: f64 = -0.5;
    let kernel = |x: f64| {
        let x = x.abs();
        if x <= 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
        } else {
            0.0
        }
    };
    let scale = in_size as f64 / out_size as f64;
    (0..out_size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale - 0.5;
            let base = center.floor() as i64;
            let t = center - base as f64;
            let mut wts = [0f64; 4];
            for (k, w) in wts.iter_mut().enumerate() {
                if (0..in_size as i64).contains(&(base - 1 + k as i64)) {
                    *w = kernel(t - (k as f64 - 1.0));
                }
            }
            let sum: f64 = wts.iter().sum();
            (base - 1, wts.map(|w| (w / sum) as f32))
        })
        .collect()
}

/// Pixels of zero padding on each side of a row in the horizontal pass, so that every output
/// pixel's four taps are consecutive (those outside the crop have weight 0).
const PAD: usize = 2;

/// Crops `(y, x, h, w)` out of `img` and resizes it to `out_h × out_w` with bicubic interpolation.
pub fn crop_resize_bicubic(
    img: &FImage,
    region: (usize, usize, usize, usize),
    out_h: usize,
    out_w: usize,
) -> FImage {
    resize_from(
        |y, x, c| img.data[(y * img.width + x) * 3 + c],
        region,
        out_h,
        out_w,
    )
}

/// The same from a decoded image, reading only the crop (gray replicated to three channels), so
/// a large source is never converted to floats as a whole.
pub fn crop_resize_image(
    img: &Image,
    region: (usize, usize, usize, usize),
    out_h: usize,
    out_w: usize,
) -> FImage {
    let (w, chans) = (img.width, img.channels);
    let (y0, x0, ch, cw) = region;
    let fill = |r: usize, row: &mut [f32]| {
        let start = ((y0 + r) * w + x0) * chans;
        let src = &img.data[start..start + cw * chans];
        if chans == 1 {
            for (d, &v) in row.chunks_exact_mut(3).zip(src) {
                d.fill(UNIT[v as usize]);
            }
        } else {
            for (d, &v) in row.iter_mut().zip(src) {
                *d = UNIT[v as usize];
            }
        }
    };
    resize_rows(fill, (ch, cw), out_h, out_w)
}

fn resize_from(
    px: impl Fn(usize, usize, usize) -> f32,
    (y0, x0, ch, cw): (usize, usize, usize, usize),
    out_h: usize,
    out_w: usize,
) -> FImage {
    resize_rows(
        |r, row: &mut [f32]| {
            for (c, v) in row.iter_mut().enumerate() {
                *v = px(y0 + r, x0 + c / 3, c % 3);
            }
        },
        (ch, cw),
        out_h,
        out_w,
    )
}

/// The bicubic resize of a `ch × cw` RGB crop whose row `r` `fill(r, row)` writes (interleaved,
/// `3·cw` floats): each source row is read once into a buffer, then the taps run on floats.
fn resize_rows(
    fill: impl Fn(usize, &mut [f32]),
    (ch, cw): (usize, usize),
    out_h: usize,
    out_w: usize,
) -> FImage {
    if out_h == 0 || out_w == 0 || ch == 0 || cw == 0 {
        return FImage::zeros(out_h, out_w);
    }
    let mut padded = vec![0f32; (cw + 2 * PAD) * 3];
    let mut out = FImage::zeros(out_h, out_w);
    if (ch, cw) == (out_h, out_w) {
        for (r, dst) in out.data.chunks_exact_mut(cw * 3).enumerate() {
            fill(r, dst);
        }
        return out;
    }
    let tx = cubic_taps(cw, out_w);
    let ty = cubic_taps(ch, out_h);
    // Horizontal pass over the crop's rows, then vertical.
    let mut tmp = vec![0f32; ch * out_w * 3];
    for (r, dst_row) in tmp.chunks_exact_mut(out_w * 3).enumerate() {
        fill(r, &mut padded[PAD * 3..(PAD + cw) * 3]);
        for ((first, w), d) in tx.iter().zip(dst_row.chunks_exact_mut(3)) {
            let start = (first + PAD as i64) as usize * 3;
            let s = &padded[start..start + 12];
            for (c, v) in d.iter_mut().enumerate() {
                *v = w[0] * s[c] + w[1] * s[3 + c] + w[2] * s[6 + c] + w[3] * s[9 + c];
            }
        }
    }
    let stride = out_w * 3;
    for (o, (first, w)) in ty.iter().enumerate() {
        let dst = &mut out.data[o * stride..(o + 1) * stride];
        for (k, &wk) in w.iter().enumerate() {
            // A tap outside the crop has weight 0; any row will do.
            let y = (first + k as i64).clamp(0, ch as i64 - 1) as usize;
            let src = &tmp[y * stride..(y + 1) * stride];
            for (d, s) in dst.iter_mut().zip(src) {
                *d += wk * s;
            }
        }
    }
    out
}

pub fn flip_horizontal(img: &mut FImage) {
    for row in img.data.chunks_exact_mut(img.width * 3) {
        let w = img.width;
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

pub fn adjust_brightness_mul(img: &mut FImage, factor: f32) {
    img.data.iter_mut().for_each(|v| *v *= factor);
}

/// `tf.image.adjust_contrast`: `(x − mean) · f + mean`, per channel, mean over the image.
pub fn adjust_contrast(img: &mut FImage, factor: f32) {
    let n = (img.height * img.width) as f32;
    let mut mean = [0f32; 3];
    for px in img.data.chunks_exact(3) {
        for c in 0..3 {
            mean[c] += px[c];
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    for px in img.data.chunks_exact_mut(3) {
        for c in 0..3 {
            px[c] = (px[c] - mean[c]) * factor + mean[c];
        }
    }
}

/// RGB → HSV with h, s, v in [0, 1].
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    let s = if max > 0.0 { delta / max } else { 0.0 };
    let mut h = if delta <= 0.0 {
        0.0
    } else if max == r {
        (g - b) / delta
    } else if max == g {
        2.0 + (b - r) / delta
    } else {
        4.0 + (r - g) / delta
    } / 6.0;
    if h < 0.0 {
        h += 1.0;
    }
    (h, s, max)
}

/// `x.floor()` for |x| < 2³¹ without the `floorf` call that the baseline x86-64 target
/// compiles it to (no SSE4.1 `roundss` there).
#[inline(always)]
fn floor_small(x: f32) -> f32 {
    let t = x as i32 as f32;
    if t > x {
        t - 1.0
    } else {
        t
    }
}

pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let c = v * s;
    let hp = (h - floor_small(h)) * 6.0;
    // `hp % 2` for hp in [0, 6), without `fmodf`.
    let x = c * (1.0 - ((hp - 2.0 * floor_small(hp * 0.5)) - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    (r + m, g + m, b + m)
}

/// `tf.image.adjust_saturation` (`s ← clip(s·f, 0, 1)` in HSV) and `adjust_hue` (`h ← h + δ mod 1`).
///
/// A pure saturation change (`hue_delta` 0) takes a shortcut with the same result: with h and v
/// fixed, every channel of `hsv_to_rgb` is `v − s·v·k(h)`, so scaling s by `s'/s` moves each
/// channel towards v by that ratio, `x' = v − (s'/s)·(v − x)`, with no trip through HSV.
pub fn adjust_saturation_hue(img: &mut FImage, saturation: f32, hue_delta: f32) {
    if hue_delta == 0.0 {
        for px in img.data.chunks_exact_mut(3) {
            let max = px[0].max(px[1]).max(px[2]);
            let min = px[0].min(px[1]).min(px[2]);
            if max <= 0.0 || max == min {
                continue; // black or gray: saturation 0 stays 0
            }
            let s = (max - min) / max;
            let ratio = (s * saturation).clamp(0.0, 1.0) / s;
            for v in px.iter_mut() {
                *v = max - ratio * (max - *v);
            }
        }
        return;
    }
    for px in img.data.chunks_exact_mut(3) {
        let [r, g, b] = [px[0], px[1], px[2]];
        // rgb_to_hsv and hsv_to_rgb, written without branches on the colour: which channel is
        // the largest and which sixth of the hue circle a pixel lands in vary from pixel to
        // pixel, and mispredicted branches were most of this function's time.
        let max = r.max(g).max(b);
        let delta = max - r.min(g).min(b);
        let s = if max > 0.0 { delta / max } else { 0.0 };
        let inv = if delta > 0.0 { 1.0 / delta } else { 0.0 };
        let h6 = if max == r {
            (g - b) * inv
        } else if max == g {
            2.0 + (b - r) * inv
        } else {
            4.0 + (r - g) * inv
        };
        let h6 = if h6 < 0.0 { h6 + 6.0 } else { h6 };
        // `rem_euclid(1.0)` without the `fmodf` call it compiles to.
        let h = h6 / 6.0 + hue_delta;
        let hp = (h - floor_small(h)) * 6.0;
        let c = max * (s * saturation).clamp(0.0, 1.0);
        // Channel n ∈ {5, 3, 1} (r, g, b) is v − c·clamp(min(k, 4 − k), 0, 1), k = (n + hp) mod 6.
        for (v, n) in px.iter_mut().zip([5.0f32, 3.0, 1.0]) {
            let k = n + hp;
            let k = if k >= 6.0 { k - 6.0 } else { k };
            *v = max - c * k.min(4.0 - k).clamp(0.0, 1.0);
        }
    }
}

/// `tf.image.rgb_to_grayscale` tiled back to three channels.
pub fn to_grayscale(img: &mut FImage) {
    for px in img.data.chunks_exact_mut(3) {
        let y = 0.2989 * px[0] + 0.5870 * px[1] + 0.1140 * px[2];
        px.copy_from_slice(&[y, y, y]);
    }
}

/// The four colour operations in random order, clipping after each (`color_jitter_rand`).
/// `gray` says the image has three equal channels: saturation and hue leave such an image
/// unchanged, so they are skipped (their random draws are still made, to keep streams aligned).
pub fn color_jitter(img: &mut FImage, strength: f32, gray: bool, rng: &mut impl Rng) {
    let (b, c, s, h) = (
        0.8 * strength,
        0.8 * strength,
        0.8 * strength,
        0.2 * strength,
    );
    let mut order = [0usize, 1, 2, 3];
    for i in (1..4).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    for op in order {
        match op {
            0 => {
                let f = rng.random_range((1.0 - b).max(0.0)..=1.0 + b);
                adjust_brightness_mul(img, f);
            }
            1 => {
                let f = rng.random_range(1.0 - c..=1.0 + c);
                adjust_contrast(img, f);
            }
            2 => {
                let f = rng.random_range(1.0 - s..=1.0 + s);
                if !gray {
                    adjust_saturation_hue(img, f, 0.0);
                }
            }
            _ => {
                let d = rng.random_range(-h..=h);
                if !gray {
                    adjust_saturation_hue(img, 1.0, d);
                }
            }
        }
        img.clip();
    }
}

/// One training view of `image` (blur excepted, see [`blur_batch_chw`]).
pub fn augment(image: &Image, cfg: &AugmentConfig, rng: &mut impl Rng) -> FImage {
    let region = if cfg.crop {
        sample_crop_area(image.height, image.width, cfg.crop_min_area, rng)
    } else {
        (0, 0, image.height, image.width)
    };
    let mut img = crop_resize_image(image, region, cfg.image_size, cfg.image_size);
    if cfg.flip && rng.random::<f32>() < 0.5 {
        flip_horizontal(&mut img);
    }
    if cfg.color_jitter_strength > 0.0 {
        if rng.random::<f32>() < 0.8 {
            color_jitter(
                &mut img,
                cfg.color_jitter_strength,
                image.channels == 1,
                rng,
            );
        }
        if rng.random::<f32>() < 0.2 {
            to_grayscale(&mut img);
        }
    }
    img.clip();
    img
}

/// The official `center_crop`: keep 0.875 of the image at the target aspect ratio, offsets
/// `((H − h) + 1) / 2`, sizes rounded half-to-even. Returns `(y, x, h, w)`.
pub fn center_crop_region(
    height: usize,
    width: usize,
    out_h: usize,
    out_w: usize,
) -> (usize, usize, usize, usize) {
    let (hf, wf) = (height as f64, width as f64);
    let aspect = out_w as f64 / out_h as f64;
    let (ch, cw) = if aspect > wf / hf {
        (
            (CROP_PROPORTION / aspect * wf).round_ties_even(),
            (CROP_PROPORTION * wf).round_ties_even(),
        )
    } else {
        (
            (CROP_PROPORTION * hf).round_ties_even(),
            (CROP_PROPORTION * aspect * hf).round_ties_even(),
        )
    };
    let (ch, cw) = ((ch as usize).max(1), (cw as usize).max(1));
    ((height - ch).div_ceil(2), (width - cw).div_ceil(2), ch, cw)
}

/// Evaluation preprocessing: centre crop + bicubic resize, or only a resize (none if the size
/// already matches) at ≤ 32 px, where the official code skips the test crop.
pub fn eval_preprocess(image: &Image, image_size: usize) -> FImage {
    let region = if image_size <= SMALL_IMAGE {
        (0, 0, image.height, image.width)
    } else {
        center_crop_region(image.height, image.width, image_size, image_size)
    };
    let mut img = crop_resize_image(image, region, image_size, image_size);
    img.clip();
    img
}

/// The blur kernel of the official `gaussian_blur`: `radius = (side / 10) / 2`, `2·radius + 1` taps.
pub fn gaussian_kernel(side: usize, sigma: f32) -> Vec<f32> {
    let radius = (side / 10 / 2) as i64;
    let w: Vec<f32> = (-radius..=radius)
        .map(|x| (-((x * x) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = w.iter().sum();
    w.into_iter().map(|v| v / sum).collect()
}

/// Separable Gaussian blur of one CHW image in place, zero padding ("SAME"), then clip.
///
/// Rows are copied into a zero-padded buffer so the tap loops run branch-free over whole rows.
/// `kernel` has an odd length and is symmetric, as [`gaussian_kernel`]'s.
pub fn blur_chw(img: &mut [f32], height: usize, width: usize, kernel: &[f32]) {
    assert!(
        kernel.len() % 2 == 1,
        "blur kernels have an odd number of taps"
    );
    let r = kernel.len() / 2;
    let mut padded = vec![0f32; width + 2 * r];
    let mut tmp = vec![0f32; (height + 2 * r) * width];
    for plane in img.chunks_exact_mut(height * width) {
        // Horizontal: tmp rows r..r+height hold the blurred rows; the r rows around stay zero.
        for y in 0..height {
            padded[r..r + width].copy_from_slice(&plane[y * width..(y + 1) * width]);
            let dst = &mut tmp[(y + r) * width..(y + r + 1) * width];
            // The kernel is symmetric: taps k and 2r − k share a weight, one multiply for both.
            for (d, s) in dst.iter_mut().zip(&padded[r..r + width]) {
                *d = kernel[r] * s;
            }
            for (k, &w) in kernel[..r].iter().enumerate() {
                let (lo, hi) = (&padded[k..k + width], &padded[2 * r - k..]);
                for ((d, a), b) in dst.iter_mut().zip(lo).zip(hi) {
                    *d += w * (a + b);
                }
            }
        }
        // Vertical.
        for y in 0..height {
            let dst = &mut plane[y * width..(y + 1) * width];
            let row = |k: usize| &tmp[(y + k) * width..(y + k + 1) * width];
            for (d, s) in dst.iter_mut().zip(row(r)) {
                *d = kernel[r] * s;
            }
            for (k, &w) in kernel[..r].iter().enumerate() {
                for ((d, a), b) in dst.iter_mut().zip(row(k)).zip(row(2 * r - k)) {
                    *d += w * (a + b);
                }
            }
            dst.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
        }
    }
}

/// `batch_random_blur`: one σ ~ U[0.1, 2] for the whole view-batch, each image blurred with
/// p 0.5. `batch` is `n × 3 × side × side`. The draws come from `rng` in a fixed order and the
/// images are blurred in parallel on the current rayon pool. Returns which images were blurred.
pub fn blur_batch_chw(batch: &mut [f32], side: usize, rng: &mut impl Rng) -> Vec<bool> {
    use rayon::prelude::*;
    let sigma = rng.random_range(0.1f32..=2.0);
    let kernel = gaussian_kernel(side, sigma);
    let per = 3 * side * side;
    let selected: Vec<bool> = (0..batch.len() / per)
        .map(|_| rng.random::<f32>() < 0.5)
        .collect();
    batch
        .par_chunks_exact_mut(per)
        .zip(selected.par_iter())
        .filter(|(_, &sel)| sel)
        .for_each(|(img, _)| blur_chw(img, side, side, &kernel));
    selected
}
