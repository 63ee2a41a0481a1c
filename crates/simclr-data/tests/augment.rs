//! Augmentation behaviour over many draws, and the deterministic operations against hand
//! computations.

mod common;

use common::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use simclr_data::augment::*;
use simclr_data::{Dataset, FImage, Image};

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

#[test]
fn a_larger_minimum_crop_area_is_honoured() {
    for (h, w, slack) in [(28usize, 28usize, 0.06), (224, 224, 0.01)] {
        let mut r = rng(5);
        let n = 5000;
        let (mut below_60, mut sum) = (0, 0.0);
        for _ in 0..n {
            let (y, x, ch, cw) = sample_crop_area(h, w, 0.5, &mut r);
            assert!(y + ch <= h && x + cw <= w, "crop inside the image");
            let area = (ch * cw) as f64 / (h * w) as f64;
            // a ~ U[0.5, 1] is the smallest area of an attempt, up to the pixel rounding of
            // the height and of round(h·r).
            assert!(area >= 0.5 - slack, "area {area} at {h}×{w}");
            below_60 += usize::from(area < 0.6);
            sum += area;
        }
        // Still a crop, not the whole image: areas near the minimum occur.
        assert!(
            below_60 > n / 20,
            "{below_60} of {n} crops under 0.6 at {h}×{w}"
        );
        let mean = sum / n as f64;
        assert!((0.6..0.9).contains(&mean), "mean area {mean}");
    }
}

#[test]
fn inception_crop_area_and_aspect_distribution() {
    for (h, w) in [(224usize, 224usize), (256, 320), (28, 28)] {
        let mut r = rng(1);
        let n = 20_000;
        let (mut sum, mut small, mut large, mut whole) = (0.0, 0, 0, 0);
        for _ in 0..n {
            let (y, x, ch, cw) = sample_crop(h, w, &mut r);
            assert!(y + ch <= h && x + cw <= w, "crop inside the image");
            let area = (ch * cw) as f64 / (h * w) as f64;
            // min_object_covered = 0.1 with the whole image as the box.
            assert!((0.1..=1.0).contains(&area), "area {area}");
            // The width is round(h·r): the aspect is within the range up to half a pixel.
            let aspect = (cw as f64 / ch as f64) / (w as f64 / h as f64);
            let slack = 0.5 / ch as f64 / (w as f64 / h as f64) + 1e-9;
            if (ch, cw) != (h, w) {
                assert!(
                    aspect >= 0.75 - slack && aspect <= 4.0 / 3.0 + slack,
                    "aspect {aspect} for {ch}x{cw}"
                );
            } else {
                whole += 1;
            }
            sum += area;
            small += (area < 0.2) as usize;
            large += (area > 0.9) as usize;
        }
        let mean = sum / n as f64;
        assert!(
            (0.35..0.75).contains(&mean),
            "mean crop area {mean} at {h}x{w}"
        );
        assert!(
            small > n / 100 && large > n / 50,
            "both small ({small}) and large ({large}) crops occur"
        );
        assert!(whole < n / 5, "{whole} whole-image crops");
    }
}

#[test]
fn crop_of_a_single_pixel_is_the_whole_image() {
    let mut r = rng(2);
    for _ in 0..50 {
        assert_eq!(sample_crop(1, 1, &mut r), (0, 0, 1, 1));
    }
}

#[test]
fn bicubic_matches_hand_computation() {
    // 4 → 2 along x: output 0 samples x = 0.5; Keys(a = −0.5) taps at −1, 0, 1, 2 weigh
    // −1/16, 9/16, 9/16, −1/16; tap −1 is outside and dropped, the rest renormalised.
    let row = [0.1f32, 0.7, 0.2, 0.9];
    let img = FImage {
        height: 1,
        width: 4,
        data: row.iter().flat_map(|&v| [v, v, v]).collect(),
    };
    let out = crop_resize_bicubic(&img, (0, 0, 1, 4), 1, 2);
    let w = [9.0 / 16.0, 9.0 / 16.0, -1.0 / 16.0];
    let expect0 = (w[0] * 0.1 + w[1] * 0.7 + w[2] * 0.2) / (w[0] + w[1] + w[2]);
    let expect1 = (-1.0 / 16.0 * 0.7 + 9.0 / 16.0 * 0.2 + 9.0 / 16.0 * 0.9) / (17.0 / 16.0);
    assert!(
        (out.data[0] as f64 - expect0).abs() < 1e-6,
        "{} vs {expect0}",
        out.data[0]
    );
    assert!(
        (out.data[3] as f64 - expect1).abs() < 1e-6,
        "{} vs {expect1}",
        out.data[3]
    );

    // Cubic convolution reproduces a linear ramp away from the borders, and constants everywhere.
    let ramp = FImage {
        height: 8,
        width: 8,
        data: (0..64)
            .flat_map(|p| {
                let v = (p % 8) as f32 / 10.0;
                [v, v, 0.5]
            })
            .collect(),
    };
    let up = crop_resize_bicubic(&ramp, (0, 0, 8, 8), 16, 16);
    for y in 0..16 {
        for x in 4..12 {
            let src = (x as f32 + 0.5) / 2.0 - 0.5;
            let px = &up.data[(y * 16 + x) * 3..];
            assert!(
                (px[0] - src / 10.0).abs() < 1e-5,
                "ramp at {x}: {} vs {}",
                px[0],
                src / 10.0
            );
            assert!((px[2] - 0.5).abs() < 1e-6);
        }
    }
    // Same size, no crop: identity.
    assert_eq!(crop_resize_bicubic(&ramp, (0, 0, 8, 8), 8, 8), ramp);
}

#[test]
fn centre_crop_regions_by_hand() {
    // Wider than square: keep 0.875·256 = 224 rows and as many columns, centred.
    assert_eq!(center_crop_region(256, 320, 224, 224), (16, 48, 224, 224));
    // Taller: 0.875·200 = 175; offsets (125 + 1) / 2 = 63 and (25 + 1) / 2 = 13.
    assert_eq!(center_crop_region(300, 200, 224, 224), (63, 13, 175, 175));
    // rint rounds half to even: 0.875·20 = 17.5 → 18; 0.875·36 = 31.5 → 32.
    assert_eq!(center_crop_region(20, 20, 8, 8).2, 18);
    assert_eq!(center_crop_region(36, 36, 8, 8).2, 32);
}

#[test]
fn eval_preprocess_small_images_pass_through() {
    let (img, _) = fmnist_images(1, 1).remove(0);
    let out = eval_preprocess(&img, 28);
    for (p, &v) in img.data.iter().enumerate() {
        for c in 0..3 {
            assert_eq!(out.data[p * 3 + c], v as f32 / 255.0);
        }
    }
    let big = Image::new(
        64,
        80,
        3,
        (0..64 * 80 * 3).map(|i| (i % 251) as u8).collect(),
    );
    let out = eval_preprocess(&big, 48);
    assert_eq!((out.height, out.width), (48, 48));
    assert!(out.data.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn colour_operations_by_hand() {
    assert_eq!(rgb_to_hsv(1.0, 0.0, 0.0), (0.0, 1.0, 1.0));
    let (h, s, v) = rgb_to_hsv(0.2, 0.4, 0.8);
    assert!(
        (h - (4.0 + (0.2 - 0.4) / 0.6) / 6.0).abs() < 1e-6 && (s - 0.75).abs() < 1e-6 && v == 0.8
    );
    let mut r = rng(3);
    for _ in 0..1000 {
        use rand::Rng;
        let c: [f32; 3] = [r.random(), r.random(), r.random()];
        let (h, s, v) = rgb_to_hsv(c[0], c[1], c[2]);
        let back = hsv_to_rgb(h, s, v);
        assert!(
            (back.0 - c[0]).abs() < 1e-5
                && (back.1 - c[1]).abs() < 1e-5
                && (back.2 - c[2]).abs() < 1e-5
        );
    }
    // A hue shift of 1/3 turns red into green; saturation 0 makes gray (v, v, v).
    let mut img = FImage {
        height: 1,
        width: 2,
        data: vec![1.0, 0.0, 0.0, 0.3, 0.6, 0.9],
    };
    adjust_saturation_hue(&mut img, 1.0, 1.0 / 3.0);
    assert!((img.data[0] - 0.0).abs() < 1e-5 && (img.data[1] - 1.0).abs() < 1e-5);
    adjust_saturation_hue(&mut img, 0.0, 0.0);
    assert!((img.data[3] - 0.9).abs() < 1e-5 && (img.data[4] - 0.9).abs() < 1e-5);
    // Contrast keeps each channel's mean.
    let mut img = colour_dataset(1, 1).image(0).unwrap().to_rgb_f32();
    let mean = |im: &FImage, c: usize| {
        im.data
            .iter()
            .skip(c)
            .step_by(3)
            .map(|&v| v as f64)
            .sum::<f64>()
    };
    let before = [mean(&img, 0), mean(&img, 1), mean(&img, 2)];
    adjust_contrast(&mut img, 1.7);
    for (c, b) in before.iter().enumerate() {
        assert!((mean(&img, c) - b).abs() < 1e-3 * b.max(1.0));
    }
    // Grayscale: the official luma weights.
    let mut img = FImage {
        height: 1,
        width: 1,
        data: vec![0.5, 0.25, 1.0],
    };
    to_grayscale(&mut img);
    let y = 0.2989 * 0.5 + 0.5870 * 0.25 + 0.1140;
    assert!(img.data.iter().all(|&v| (v - y).abs() < 1e-6));
}

fn binomial_ok(count: usize, n: usize, p: f64) -> bool {
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (count as f64 - n as f64 * p).abs() < 5.0 * sd
}

#[test]
fn flip_grayscale_and_jitter_frequencies() {
    let ds = colour_dataset(3, 1);
    let src = ds.image(2).unwrap();
    let n = 4000;
    // Flip only: an output equals either the image or its mirror.
    let cfg = AugmentConfig {
        image_size: 28,
        crop: false,
        flip: true,
        color_jitter_strength: 0.0,
        use_blur: false,
        crop_min_area: CROP_MIN_AREA,
    };
    let plain = src.to_rgb_f32();
    let mut flips = 0;
    let mut r = rng(4);
    for _ in 0..n {
        let out = augment(&src, &cfg, &mut r);
        if out != plain {
            let mut back = out.clone();
            flip_horizontal(&mut back);
            assert!(back == plain, "neither the image nor its mirror");
            flips += 1;
        }
    }
    assert!(binomial_ok(flips, n, 0.5), "{flips} flips of {n}");

    // Colour distortion at s = 1 on a colour image: grayscale 20 % of the time, and jitter
    // (which changes the image) on 80 %.
    let cfg = AugmentConfig {
        image_size: 28,
        crop: false,
        flip: false,
        color_jitter_strength: 1.0,
        use_blur: false,
        crop_min_area: CROP_MIN_AREA,
    };
    let (mut gray, mut unchanged) = (0, 0);
    for _ in 0..n {
        let out = augment(&src, &cfg, &mut r);
        assert!(out.data.iter().all(|v| (0.0..=1.0).contains(v)));
        gray += out.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]) as usize;
        unchanged += (out == plain) as usize;
    }
    assert!(binomial_ok(gray, n, 0.2), "{gray} grayscale of {n}");
    // Unchanged only when neither jitter (p 0.8) nor grayscale (p 0.2) fired: 0.2 · 0.8.
    assert!(
        binomial_ok(unchanged, n, 0.16),
        "{unchanged} unchanged of {n}"
    );
}

#[test]
fn pretrain_recipes() {
    let small = AugmentConfig::pretrain(32);
    assert_eq!((small.color_jitter_strength, small.use_blur), (0.5, false));
    let large = AugmentConfig::pretrain(224);
    assert_eq!((large.color_jitter_strength, large.use_blur), (1.0, true));
    let ft = AugmentConfig::finetune(224);
    assert!(ft.crop && ft.flip && ft.color_jitter_strength == 0.0 && !ft.use_blur);
}

#[test]
fn gaussian_kernel_against_the_formula() {
    let k = gaussian_kernel(224, 1.5);
    assert_eq!(k.len(), 23, "kernel 22 → radius 11 → 23 taps");
    let z: f64 = (-11i32..=11)
        .map(|x| (-(x * x) as f64 / (2.0 * 1.5 * 1.5)).exp())
        .sum();
    for (i, &w) in k.iter().enumerate() {
        let x = i as f64 - 11.0;
        assert!((w as f64 - (-(x * x) / 4.5).exp() / z).abs() < 1e-7);
    }
    assert_eq!(gaussian_kernel(28, 1.0).len(), 3);
}

#[test]
fn blur_batch_frequency_and_effect() {
    let side = 40;
    let per = 3 * side * side;
    let mut r = rng(5);
    let mut selected = 0;
    let rounds = 40;
    for _ in 0..rounds {
        // Checkerboards: blurring lowers the contrast, so blurred images are recognisable.
        let mut batch: Vec<f32> = (0..50 * per)
            .map(|i| ((i % side + (i / side) % side) % 2) as f32)
            .collect();
        let sel = blur_batch_chw(&mut batch, side, &mut r);
        for (img, &s) in batch.chunks(per).zip(&sel) {
            let centre = img[20 * side + 20];
            if s {
                assert!(centre > 0.0 && centre < 1.0, "blurred");
            } else {
                assert!(centre == 0.0 || centre == 1.0, "untouched");
            }
        }
        selected += sel.iter().filter(|&&s| s).count();
    }
    assert!(binomial_ok(selected, rounds * 50, 0.5), "{selected}");
    // A constant image away from the zero-padded border stays constant.
    let mut flat = vec![0.5f32; per];
    blur_chw(&mut flat, side, side, &gaussian_kernel(side, 2.0));
    assert!((flat[20 * side + 20] - 0.5).abs() < 1e-6);
    assert!(flat[0] < 0.5, "zero padding darkens the corner");
}

#[test]
fn saturation_shortcut_equals_the_trip_through_hsv() {
    use rand::Rng;
    let mut r = rng(17);
    for factor in [0.0f32, 0.2, 0.9, 1.0, 1.6, 5.0] {
        let data: Vec<f32> = (0..300)
            .map(|i| if i < 6 { 0.5 } else { r.random::<f32>() })
            .collect();
        let mut img = FImage {
            height: 10,
            width: 10,
            data: data.clone(),
        };
        adjust_saturation_hue(&mut img, factor, 0.0);
        for (px, got) in data.chunks_exact(3).zip(img.data.chunks_exact(3)) {
            let (h, s, v) = rgb_to_hsv(px[0], px[1], px[2]);
            let want = hsv_to_rgb(h, (s * factor).clamp(0.0, 1.0), v);
            for (g, w) in got.iter().zip([want.0, want.1, want.2]) {
                assert!(
                    (g - w).abs() < 2e-6,
                    "factor {factor}: {px:?} -> {got:?}, want {want:?}"
                );
            }
        }
    }
}

#[test]
fn blur_equals_a_direct_zero_padded_convolution() {
    use rand::Rng;
    let mut r = rng(23);
    let (h, w) = (13usize, 17usize);
    let kernel = gaussian_kernel(64, 1.3); // radius 3: 7 taps
    assert_eq!(kernel.len(), 7);
    let img: Vec<f32> = (0..3 * h * w).map(|_| r.random::<f32>()).collect();
    let mut got = img.clone();
    blur_chw(&mut got, h, w, &kernel);
    let rad = 3i64;
    for c in 0..3 {
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let mut acc = 0f64;
                for dy in -rad..=rad {
                    for dx in -rad..=rad {
                        let (yy, xx) = (y + dy, x + dx);
                        if (0..h as i64).contains(&yy) && (0..w as i64).contains(&xx) {
                            let v = img[c * h * w + yy as usize * w + xx as usize] as f64;
                            acc += kernel[(dy + rad) as usize] as f64
                                * kernel[(dx + rad) as usize] as f64
                                * v;
                        }
                    }
                }
                let g = got[c * h * w + y as usize * w + x as usize] as f64;
                assert!(
                    (g - acc.clamp(0.0, 1.0)).abs() < 1e-5,
                    "({c}, {y}, {x}): {g} vs {acc}"
                );
            }
        }
    }
}

#[test]
fn hue_shift_equals_the_trip_through_hsv() {
    use rand::Rng;
    let mut r = rng(29);
    for delta in [-0.2f32, -0.05, 0.01, 0.13, 0.2] {
        let mut data: Vec<f32> = (0..600).map(|_| r.random::<f32>()).collect();
        // Gray, black and saturated pixels too.
        data[..12].copy_from_slice(&[0.4, 0.4, 0.4, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.3, 1.0]);
        let mut img = FImage {
            height: 10,
            width: 20,
            data: data.clone(),
        };
        adjust_saturation_hue(&mut img, 1.0, delta);
        for (px, got) in data.chunks_exact(3).zip(img.data.chunks_exact(3)) {
            let (h, s, v) = rgb_to_hsv(px[0], px[1], px[2]);
            let want = hsv_to_rgb((h + delta).rem_euclid(1.0), s, v);
            for (g, w) in got.iter().zip([want.0, want.1, want.2]) {
                assert!(
                    (g - w).abs() < 2e-6,
                    "delta {delta}: {px:?} -> {got:?}, want {want:?}"
                );
            }
        }
    }
}
