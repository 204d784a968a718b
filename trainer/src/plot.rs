//! `RUN/curves.png`: the training loss and the accuracies against the step, drawn with
//! `plotters` (numbered axes, axis labels, legends, the run's name as the title) and
//! written as PNG by the `png` crate.
//!
//! Text needs a TrueType font: `BYOL_FONT` if set, else DejaVu Sans from Debian's
//! `fonts-dejavu-core` (installed by `scripts/setup`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use plotters::prelude::SeriesLabelPosition;
use plotters::prelude::*;

/// Environment variable naming the TrueType font used for the plots' text.
pub const FONT_ENV: &str = "BYOL_FONT";

/// Where the font is looked for when [`FONT_ENV`] is not set (Debian, Fedora, Arch).
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Why a plot could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("no font for the plot's text: {0}")]
    Font(String),
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("encoding {path}")]
    Png {
        path: PathBuf,
        #[source]
        source: png::EncodingError,
    },
    #[error(transparent)]
    File(#[from] byol_format::fs::FileError),
}

/// One line of a panel: its legend name, colour and points (x = step, y).
pub struct Series<'a> {
    pub name: &'a str,
    pub color: RGBColor,
    pub points: &'a [(f64, f64)],
}

/// One panel: a title, the y axis's label and its lines. `y_range` fixes the y axis
/// (else it fits the data).
pub struct Panel<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub y_range: Option<(f64, f64)>,
    pub series: &'a [Series<'a>],
    /// Where the legend goes (away from where the lines usually are).
    pub legend: SeriesLabelPosition,
}

pub const BLUE: RGBColor = RGBColor(31, 119, 180);
pub const ORANGE: RGBColor = RGBColor(255, 127, 14);
pub const GREEN: RGBColor = RGBColor(44, 160, 44);

/// Registers the font once per process as plotters' "sans-serif".
fn font() -> Result<(), PlotError> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = match std::env::var_os(FONT_ENV) {
            Some(p) => vec![PathBuf::from(p)],
            None => FONT_PATHS.iter().map(PathBuf::from).collect(),
        };
        let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            format!(
                "none of {} exists (install fonts-dejavu-core, or set {FONT_ENV})",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Registered fonts live for the whole process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a TrueType/OpenType font", path.display()))
    })
    .clone()
    .map_err(PlotError::Font)
}

/// Decimals that tell apart about ten ticks over `range`.
fn decimals(range: f64) -> usize {
    if range <= 0.0 || !range.is_finite() {
        return 2;
    }
    (-(range / 10.0).log10()).ceil().clamp(0.0, 4.0) as usize
}

/// The x and y ranges of a panel (never empty: a single point gets a margin).
fn ranges(p: &Panel<'_>) -> ((f64, f64), (f64, f64)) {
    let pts = p.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let (y0, y1) = match p.y_range {
        Some(r) => r,
        None => {
            let pad = ((y1 - y0) * 0.05)
                .max(y0.abs().max(y1.abs()) * 0.05)
                .max(1e-3);
            (y0 - pad, y1 + pad)
        }
    };
    ((x0, x1), (y0, y1))
}

/// Draws `panels` side by side under `title` into a `width`×`height` PNG at `path`
/// (written atomically).
///
/// # Errors
/// No usable font ([`FONT_ENV`]), a drawing or PNG-encoding failure, or I/O, naming the file.
pub fn save_panels(
    path: &Path,
    title: &str,
    panels: &[Panel<'_>],
    (width, height): (u32, u32),
) -> Result<(), PlotError> {
    font()?;
    let draw_err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut rgb = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let root = root
            .titled(title, ("sans-serif", 20))
            .map_err(|e| draw_err(&e))?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (area, p) in areas.iter().zip(panels) {
            let ((x0, x1), (y0, y1)) = ranges(p);
            let mut chart = ChartBuilder::on(area)
                .caption(p.title, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(|e| draw_err(&e))?;
            let (x_decimals, y_decimals) = (decimals(x1 - x0), decimals(y1 - y0));
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(p.y_label)
                .x_label_formatter(&|x| format!("{x:.x_decimals$}"))
                .y_label_formatter(&|y| format!("{y:.y_decimals$}"))
                .light_line_style(WHITE)
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(|e| draw_err(&e))?;
            for s in p.series.iter().filter(|s| !s.points.is_empty()) {
                let color = s.color;
                chart
                    .draw_series(LineSeries::new(
                        s.points.iter().copied(),
                        color.stroke_width(2),
                    ))
                    .map_err(|e| draw_err(&e))?
                    .label(s.name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                // Sparse series (the kNN monitor: one value per few epochs) get markers.
                if s.points.len() <= 30 {
                    chart
                        .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(|e| draw_err(&e))?;
                }
            }
            if p.series.iter().any(|s| !s.points.is_empty()) {
                chart
                    .configure_series_labels()
                    .position(p.legend.clone())
                    .label_font(("sans-serif", 12))
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()
                    .map_err(|e| draw_err(&e))?;
            }
        }
        root.present().map_err(|e| draw_err(&e))?;
    }
    let png_bytes = encode_rgb_png(&rgb, width, height).map_err(|source| PlotError::Png {
        path: path.to_path_buf(),
        source,
    })?;
    byol_format::fs::write_atomic(path, &png_bytes)?;
    Ok(())
}

/// PNG bytes of `width` × `height` 8-bit RGB pixels (`rgb`: rows of R, G, B bytes).
///
/// # Errors
/// The encoder's (a buffer that is not `3 × width × height` bytes).
pub fn encode_rgb_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plot_is_a_png_of_the_asked_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.png");
        let pts: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
            .collect();
        save_panels(
            &p,
            "run",
            &[Panel {
                title: "loss",
                y_label: "loss",
                y_range: None,
                legend: SeriesLabelPosition::UpperRight,
                series: &[Series {
                    name: "loss",
                    color: BLUE,
                    points: &pts,
                }],
            }],
            (400, 300),
        )
        .unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[1..4], b"PNG");
        // IHDR: width and height, big-endian, at bytes 16..24.
        assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()), 400);
        assert_eq!(u32::from_be_bytes(b[20..24].try_into().unwrap()), 300);
    }
}
