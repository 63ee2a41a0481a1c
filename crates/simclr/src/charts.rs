//! SVG charts a reader can read without the data: axes with round ticks and their labels, a
//! grid, axis titles and a legend. Hand-written SVG (a few dozen elements per chart) rather
//! than a plotting crate: the report needs lines and bars only, and the output stays small,
//! deterministic and diffable.

use std::fmt::Write as _;

const COLOURS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];
const W: f64 = 720.0;
const H: f64 = 360.0;
// Plot area margins: left (tick labels and the y title), right (legend), top, bottom.
const ML: f64 = 70.0;
const MR: f64 = 170.0;
const MT: f64 = 36.0;
const MB: f64 = 50.0;
/// Series with at most this many points are drawn with a marker at each.
const MARKED_POINTS: usize = 12;

/// About `n` round tick values (1, 2 or 5 × 10^k apart) spanning `[lo, hi]`: the first at or
/// below `lo`, the last at or above `hi`.
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        // A flat series: a unit-wide range around it.
        (lo - 0.5, lo + 0.5)
    };
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor();
    let last = (hi / step).ceil();
    // Whole multiples of the step, so labels print without accumulated rounding.
    (first as i64..=last as i64)
        .map(|k| k as f64 * step)
        .collect()
}

/// A tick label: as many decimals as the step needs, no more.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s.trim_start_matches(['-', '0', '.']).is_empty() {
        s[1..].to_string()
    } else {
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The frame every chart shares: title, grid, ticks and their labels on both axes, axis
/// titles. `x_ticks`: `(position in data units, label)`; the y axis spans `y_ticks`.
struct Frame {
    svg: String,
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn new(title: &str, x_title: &str, y_title: &str, x: (f64, f64), y_ticks: &[f64]) -> Frame {
        let y = (y_ticks[0], *y_ticks.last().unwrap_or(&y_ticks[0]));
        let mut f = Frame {
            svg: format!(
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text class="title" x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
                (ML + W - MR) / 2.0,
                escape(title)
            ),
            x,
            y,
        };
        let step = if y_ticks.len() > 1 {
            y_ticks[1] - y_ticks[0]
        } else {
            1.0
        };
        for &t in y_ticks {
            let py = f.py(t);
            let _ = write!(
                f.svg,
                r##"<line class="grid" x1="{ML}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#dddddd"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - MR,
                ML - 6.0,
                py + 4.0,
                tick_label(t, step)
            );
        }
        let _ = write!(
            f.svg,
            r#"<line class="axis" x1="{ML}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/><line class="axis" x1="{ML}" y1="{MT}" x2="{ML}" y2="{:.1}" stroke="black"/><text class="axis-title" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text class="axis-title" transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            H - MB,
            W - MR,
            H - MB,
            H - MB,
            (ML + W - MR) / 2.0,
            H - 12.0,
            escape(x_title),
            (MT + H - MB) / 2.0,
            escape(y_title)
        );
        f
    }

    fn px(&self, v: f64) -> f64 {
        ML + (v - self.x.0) / (self.x.1 - self.x.0).max(1e-12) * (W - ML - MR)
    }

    fn py(&self, v: f64) -> f64 {
        H - MB - (v - self.y.0) / (self.y.1 - self.y.0).max(1e-12) * (H - MT - MB)
    }

    fn x_tick(&mut self, at: f64, label: &str, grid: bool) {
        let px = self.px(at);
        if grid {
            let _ = write!(
                self.svg,
                r##"<line class="grid" x1="{px:.1}" y1="{MT}" x2="{px:.1}" y2="{:.1}" stroke="#dddddd"/>"##,
                H - MB
            );
        }
        let _ = write!(
            self.svg,
            r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="black"/><text class="tick" x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            H - MB,
            H - MB + 4.0,
            H - MB + 17.0,
            escape(label)
        );
    }

    fn legend(&mut self, names: &[&str]) {
        for (i, name) in names.iter().enumerate() {
            let c = COLOURS[i % COLOURS.len()];
            let y = MT + 8.0 + 18.0 * i as f64;
            let x = W - MR + 14.0;
            let _ = write!(
                self.svg,
                r#"<g class="legend"><rect x="{x}" y="{:.1}" width="14" height="10" fill="{c}"/><text x="{}" y="{y:.1}">{}</text></g>"#,
                y - 9.0,
                x + 20.0,
                escape(name)
            );
        }
    }

    fn finish(mut self) -> String {
        self.svg.push_str("</svg>");
        self.svg
    }
}

/// A line chart of `(x, y)` series on shared axes; non-finite points are skipped, and an empty
/// chart says so.
pub fn line_chart(
    title: &str,
    x_title: &str,
    y_title: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if pts.is_empty() {
        let mut f = Frame::new(title, x_title, y_title, (0.0, 1.0), &[0.0, 1.0]);
        let _ = write!(
            f.svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">no data</text>"#,
            (ML + W - MR) / 2.0,
            H / 2.0
        );
        return f.finish();
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let yt = nice_ticks(y0, y1, 5);
    let xt = nice_ticks(x0, x1, 6);
    let x_span = (xt[0], *xt.last().unwrap());
    let mut f = Frame::new(title, x_title, y_title, x_span, &yt);
    let x_step = if xt.len() > 1 { xt[1] - xt[0] } else { 1.0 };
    for &t in &xt {
        f.x_tick(t, &tick_label(t, x_step), true);
    }
    for (i, (_, s)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = s
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", f.px(p.0), f.py(p.1)))
            .collect();
        let _ = write!(
            f.svg,
            r#"<polyline class="series" fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        // A series of a few points (a grid of runs, not a training curve) shows each point.
        if path.len() <= MARKED_POINTS {
            for p in &path {
                let (x, y) = p.split_once(',').unwrap_or_default();
                let _ = write!(
                    f.svg,
                    r#"<circle class="point" cx="{x}" cy="{y}" r="3" fill="{c}"/>"#
                );
            }
        }
    }
    let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
    f.legend(&names);
    f.finish()
}

/// Grouped bars (one group per label, one bar per method), on a 0–100 axis when every value
/// lies there (accuracies in %), else on round ticks spanning the values and zero (differences,
/// which may be negative).
pub fn bar_chart(
    title: &str,
    x_title: &str,
    y_title: &str,
    groups: &[(String, Vec<(String, f64)>)],
) -> String {
    let values: Vec<f64> = groups
        .iter()
        .flat_map(|(_, b)| b.iter().map(|(_, v)| *v))
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = values
        .iter()
        .fold((0.0f64, 0.0f64), |(a, b), &v| (a.min(v), b.max(v)));
    let yt: Vec<f64> = if hi <= 100.0 && lo >= 0.0 {
        (0..=5).map(|k| 20.0 * k as f64).collect()
    } else {
        nice_ticks(lo, hi, 5)
    };
    let (y_lo, y_hi) = (yt[0], *yt.last().unwrap_or(&yt[0]));
    let n = groups.len().max(1) as f64;
    let mut f = Frame::new(title, x_title, y_title, (0.0, n), &yt);
    let mut methods: Vec<&str> = Vec::new();
    for (_, bars) in groups {
        for (m, _) in bars {
            if !methods.contains(&m.as_str()) {
                methods.push(m);
            }
        }
    }
    for (g, (label, bars)) in groups.iter().enumerate() {
        f.x_tick(g as f64 + 0.5, label, false);
        let slot = 0.8 / methods.len().max(1) as f64;
        for (name, v) in bars.iter().filter(|(_, v)| v.is_finite()) {
            let b = methods.iter().position(|m| m == name).unwrap_or(0);
            let c = COLOURS[b % COLOURS.len()];
            let (xa, xb) = (
                f.px(g as f64 + 0.1 + b as f64 * slot),
                f.px(g as f64 + 0.1 + (b as f64 + 0.9) * slot),
            );
            let (end, zero) = (f.py(v.clamp(y_lo, y_hi)), f.py(0.0));
            let (top, bottom) = (end.min(zero), end.max(zero));
            // The value's label outside the bar's end: above a rise, below a fall.
            let label_y = if *v >= 0.0 { top - 3.0 } else { bottom + 11.0 };
            let _ = write!(
                f.svg,
                r#"<rect class="bar" x="{xa:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{c}"><title>{} {v:.2}</title></rect><text x="{:.1}" y="{label_y:.1}" text-anchor="middle" font-size="10">{v:.1}</text>"#,
                xb - xa,
                bottom - top,
                escape(name),
                (xa + xb) / 2.0,
            );
        }
    }
    f.legend(&methods);
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 7.3, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(
            nice_ticks(1.0, 235.0, 6),
            vec![0.0, 50.0, 100.0, 150.0, 200.0, 250.0]
        );
        let t = nice_ticks(-0.3, 0.45, 5);
        let want = [-0.4, -0.2, 0.0, 0.2, 0.4, 0.6];
        assert_eq!(t.len(), want.len(), "{t:?}");
        assert!(
            t.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{t:?}"
        );
        for (lo, hi) in [(0.001, 0.0042), (6.2, 6.9), (-50.0, 1e4), (3.0, 3.0)] {
            let t = nice_ticks(lo, hi, 5);
            assert!(t[0] <= lo && *t.last().unwrap() >= hi, "{lo}..{hi}: {t:?}");
            assert!((3..=12).contains(&t.len()), "{lo}..{hi}: {t:?}");
            let step = t[1] - t[0];
            let mant = step / 10f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0].iter().any(|m| (mant - m).abs() < 1e-9),
                "{lo}..{hi}: step {step}"
            );
        }
        assert_eq!(tick_label(0.2 - 0.1 - 0.1, 0.2), "0.0");
        assert_eq!(tick_label(150.0, 50.0), "150");
        assert_eq!(tick_label(0.004, 0.001), "0.004");
    }

    #[test]
    fn a_line_chart_has_ticks_labels_grid_and_legend() {
        let s = vec![
            (
                "pretrain".to_string(),
                vec![(1.0, 6.4), (100.0, 5.9), (235.0, 5.5)],
            ),
            ("knn".to_string(), vec![(1.0, f64::NAN), (235.0, 5.8)]),
        ];
        let svg = line_chart("Loss", "step", "NT-Xent loss", &s);
        for want in [
            r#"text-anchor="middle">0</text>"#,
            ">250<",
            ">5.4<",
            ">6.4<",
            r#"class="axis-title""#,
            ">step<",
            ">NT-Xent loss<",
            r#"<g class="legend">"#,
            ">pretrain<",
            ">knn<",
        ] {
            assert!(svg.contains(want), "{want} missing from {svg}");
        }
        assert!(svg.matches(r#"class="grid""#).count() >= 8);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(!svg.contains("NaN"));
        assert!(line_chart("x", "step", "y", &[]).contains("no data"));
    }

    #[test]
    fn a_bar_chart_has_a_percent_axis_a_group_per_fraction_and_a_legend() {
        let g = vec![
            (
                "1% labels".to_string(),
                vec![
                    ("baseline".to_string(), 64.15),
                    ("distill".to_string(), 68.85),
                ],
            ),
            (
                "10% labels".to_string(),
                vec![
                    ("baseline".to_string(), 85.6),
                    ("distill".to_string(), 83.45),
                ],
            ),
        ];
        let svg = bar_chart("Test top-1 (%)", "labelled fraction", "top-1 (%)", &g);
        assert_eq!(svg.matches(r#"class="bar""#).count(), 4);
        for want in [
            ">0<",
            ">20<",
            ">100<",
            ">1% labels<",
            ">10% labels<",
            ">top-1 (%)<",
            ">68.8<",
        ] {
            assert!(svg.contains(want), "{want} missing");
        }
        assert_eq!(svg.matches(r#"<g class="legend">"#).count(), 2);
    }

    #[test]
    fn a_bar_chart_of_differences_spans_zero_and_draws_falls_below_it() {
        let g = vec![(
            "1%".to_string(),
            vec![("gain".to_string(), 3.5), ("loss".to_string(), -2.25)],
        )];
        let svg = bar_chart("Gain", "labelled fraction", "points", &g);
        // Ticks 2 apart from -4 to 4 (a span of 5.75 over 5 ticks rounds up to steps of 2),
        // zero among them.
        for want in [">-4<", ">-2<", ">0<", ">4<", ">3.5<", ">-2.2<"] {
            assert!(svg.contains(want), "{want} missing from {svg}");
        }
        assert!(!svg.contains(">100<"));
        // Both bars start at the zero line: one ends above it, one below.
        let zero_y = {
            let i = svg.find(r#"text-anchor="end">0</text>"#).unwrap();
            let head = &svg[..i];
            let y = head.rsplit("y=\"").next().unwrap();
            y.split('"').next().unwrap().parse::<f64>().unwrap() - 4.0
        };
        let rects: Vec<(f64, f64)> = svg
            .split(r#"<rect class="bar""#)
            .skip(1)
            .map(|r| {
                let num = |key: &str| {
                    let t = r.split(&format!(" {key}=\"")).nth(1).unwrap();
                    t.split('"').next().unwrap().parse::<f64>().unwrap()
                };
                (num("y"), num("height"))
            })
            .collect();
        assert_eq!(rects.len(), 2);
        assert!(
            (rects[0].0 + rects[0].1 - zero_y).abs() < 0.11,
            "{rects:?} {zero_y}"
        );
        assert!((rects[1].0 - zero_y).abs() < 0.11, "{rects:?} {zero_y}");
        // The fall is 2.25/3.5 of the rise.
        assert!((rects[1].1 / rects[0].1 - 2.25 / 3.5).abs() < 0.01);
    }

    #[test]
    fn a_line_chart_of_a_few_points_marks_each() {
        let s = vec![(
            "1%".to_string(),
            vec![(1.0, 60.0), (2.0, 65.0), (4.0, 70.0)],
        )];
        let svg = line_chart("Size", "parameters (M)", "top-1 (%)", &s);
        assert_eq!(svg.matches(r#"class="point""#).count(), 3);
        let long: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, i as f64)).collect();
        let svg = line_chart("Loss", "step", "loss", &[("a".to_string(), long)]);
        assert_eq!(svg.matches(r#"class="point""#).count(), 0);
    }
}
