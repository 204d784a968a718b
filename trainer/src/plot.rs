//! `RUN/curves.png`: training loss and accuracies against the step, drawn without a
//! plotting library (a small rasterizer; tch writes the PNG).

use std::path::Path;

use tch::{Kind, Tensor};

/// A series: name (unused in the picture, kept for callers), colour, points (x, y).
pub struct Series<'a> {
    pub color: [u8; 3],
    pub points: &'a [(f64, f64)],
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Bresenham line, 2 px thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// A panel at (ox, oy) of size (pw, ph) with a frame, grid lines and the series
    /// scaled to the union of their ranges.
    fn panel(
        &mut self,
        ox: i64,
        oy: i64,
        pw: i64,
        ph: i64,
        series: &[Series],
        y_range: Option<(f64, f64)>,
    ) {
        let grey = [200, 200, 200];
        let black = [0, 0, 0];
        for k in 1..4 {
            let y = oy + ph * k / 4;
            self.line((ox, y), (ox + pw, y), grey);
        }
        self.line((ox, oy), (ox + pw, oy), black);
        self.line((ox, oy + ph), (ox + pw, oy + ph), black);
        self.line((ox, oy), (ox, oy + ph), black);
        self.line((ox + pw, oy), (ox + pw, oy + ph), black);
        let pts: Vec<(f64, f64)> = series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|p| p.1.is_finite())
            .collect();
        if pts.is_empty() {
            return;
        }
        let (x0, x1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
        let (y0, y1) = y_range.unwrap_or_else(|| {
            pts.iter()
                .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)))
        });
        let (xs, ys) = ((x1 - x0).max(1e-12), (y1 - y0).max(1e-12));
        for s in series {
            let map = |p: &(f64, f64)| {
                (
                    ox + ((p.0 - x0) / xs * pw as f64).round() as i64,
                    oy + ph - ((p.1 - y0) / ys * ph as f64).round() as i64,
                )
            };
            let v: Vec<(i64, i64)> = s
                .points
                .iter()
                .filter(|p| p.1.is_finite())
                .map(map)
                .collect();
            for w in v.windows(2) {
                self.line(w[0], w[1], s.color);
            }
            if v.len() == 1 {
                for d in -2..=2 {
                    self.line((v[0].0 - 2, v[0].1 + d), (v[0].0 + 2, v[0].1 + d), s.color);
                }
            }
        }
    }
}

/// Two panels side by side: the left auto-scaled (loss), the right on [0, 1]
/// (accuracies). Blue, orange, green for the series in order.
pub fn save_curves(path: &Path, left: &[Series], right: &[Series]) -> Result<(), tch::TchError> {
    let (w, h) = (900usize, 360usize);
    let mut c = Canvas::new(w, h);
    c.panel(40, 20, 400, 320, left, None);
    c.panel(480, 20, 400, 320, right, Some((0.0, 1.0)));
    let t = Tensor::from_slice(&c.px)
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Uint8);
    let tmp = path.with_extension("tmp.png");
    tch::vision::image::save(&t, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| tch::TchError::FileFormat(e.to_string()))
}

pub const BLUE: [u8; 3] = [31, 119, 180];
pub const ORANGE: [u8; 3] = [255, 127, 14];
pub const GREEN: [u8; 3] = [44, 160, 44];
