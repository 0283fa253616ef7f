//! PNG line charts of results (plotters, with an embedded font so no system fonts are needed).

use kv_core::{KvError, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// DejaVu Sans (Bitstream Vera license, see assets/DejaVuSans.LICENSE).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// One named line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points, drawn in the order given.
    pub points: Vec<(f64, f64)>,
}

/// A line chart to draw.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    /// Title above the plot.
    pub title: &'a str,
    /// X axis label.
    pub x_label: &'a str,
    /// Y axis label.
    pub y_label: &'a str,
    /// Draw the x axis on a log scale (context lengths).
    pub log_x: bool,
    /// Start the y axis at 0, so a flat line looks flat (memory against time).
    pub y_from_zero: bool,
    /// The lines.
    pub series: Vec<Series>,
}

fn register_font() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    })
}

/// Moves the finished `tmp` over `path`, which must be new or a regular file.
fn publish(tmp: &Path, path: &Path) -> Result<()> {
    kv_models::check_replaceable(path)
        .and_then(|()| std::fs::rename(tmp, path).map_err(|e| KvError::io(path, e)))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(tmp);
        })
}

fn err(path: &Path, e: impl std::fmt::Display) -> KvError {
    KvError::io(path, format!("cannot draw chart: {e}"))
}

/// Draws `chart` into a 900x560 PNG at `path` (written whole, then renamed into place).
pub fn line_chart(path: &Path, chart: &Chart) -> Result<()> {
    if !register_font() {
        return Err(KvError::io(
            path,
            "cannot draw chart: the embedded font did not load",
        ));
    }
    let points: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if points.is_empty() {
        return Err(KvError::config(
            format!("chart {}", chart.title),
            "no finite points",
            "at least one point",
        ));
    }
    let (mut x0, mut x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        (x0, x1) = if chart.log_x {
            (x0 / 2.0, x1 * 2.0)
        } else {
            (x0 - 0.5, x1 + 0.5)
        };
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3 * y1.abs().max(1.0));
    (y0, y1) = (y0 - pad, y1 + pad);
    // plotters divides these ranges into ticks; a span that overflows would never finish.
    if !((y1 - y0).is_finite() && (x1 - x0).is_finite()) || (chart.log_x && x0 <= 0.0) {
        return Err(KvError::config(
            format!("chart {}", chart.title),
            format!("points spanning x {x0:e} .. {x1:e}, y {y0:e} .. {y1:e}"),
            "values whose range is a finite number (and x > 0 on a log axis)",
        ));
    }
    if chart.y_from_zero && y0 > 0.0 {
        y0 = 0.0;
    }
    // The encoder picks the format from the extension, so the temporary file ends in .png too.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    kv_models::check_replaceable(path)?;
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    {
        let root = BitMapBackend::new(&tmp, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(path, e))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(chart.title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70);
        macro_rules! draw {
            ($ctx:expr) => {{
                let mut ctx = $ctx;
                ctx.configure_mesh()
                    .x_desc(chart.x_label)
                    .y_desc(chart.y_label)
                    .label_style(("sans-serif", 14))
                    .draw()
                    .map_err(|e| err(path, e))?;
                for (i, s) in chart.series.iter().enumerate() {
                    let color = Palette99::pick(i).to_rgba();
                    let pts: Vec<(f64, f64)> = s
                        .points
                        .iter()
                        .copied()
                        .filter(|(x, y)| x.is_finite() && y.is_finite())
                        .collect();
                    ctx.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                        .map_err(|e| err(path, e))?
                        .label(s.name.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                        });
                    ctx.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                        .map_err(|e| err(path, e))?;
                }
                ctx.configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(|e| err(path, e))?;
            }};
        }
        if chart.log_x {
            draw!(
                builder
                    .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                    .map_err(|e| err(path, e))?
            );
        } else {
            draw!(
                builder
                    .build_cartesian_2d(x0..x1, y0..y1)
                    .map_err(|e| err(path, e))?
            );
        }
        root.present().map_err(|e| err(path, e))?;
    }
    publish(&tmp, path)
}

/// One panel of a heat-map grid: cells `(column, row, value)` on discrete axes.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title above the panel.
    pub title: String,
    /// `(column index, row index, value in [0, 1])`; absent cells stay blank.
    pub cells: Vec<(usize, usize, f64)>,
}

/// A grid of heat maps sharing their axes (NIAH: context across, depth down).
#[derive(Debug, Clone)]
pub struct HeatMaps<'a> {
    /// Title of the whole figure.
    pub title: &'a str,
    /// Column labels (left to right).
    pub columns: Vec<String>,
    /// Row labels (top to bottom).
    pub rows: Vec<String>,
    /// What the axes are.
    pub x_label: &'a str,
    /// What the rows are.
    pub y_label: &'a str,
    /// The panels, laid out left to right, top to bottom.
    pub panels: Vec<Panel>,
}

/// Red (0) through yellow to green (1), the colours of the Needle-in-a-Haystack plots.
fn score_color(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let (r, g) = if v < 0.5 {
        (220.0, 60.0 + 340.0 * v)
    } else {
        (220.0 - 360.0 * (v - 0.5), 230.0)
    };
    RGBColor(r as u8, g as u8, 70)
}

/// Draws `maps` into a PNG at `path`, panels 4 to a row.
pub fn heat_maps(path: &Path, maps: &HeatMaps) -> Result<()> {
    if !register_font() {
        return Err(KvError::io(
            path,
            "cannot draw chart: the embedded font did not load",
        ));
    }
    if maps.panels.is_empty() || maps.columns.is_empty() || maps.rows.is_empty() {
        return Err(KvError::config(
            format!("chart {}", maps.title),
            "no cells",
            "at least one panel with cells",
        ));
    }
    let per_row = maps.panels.len().min(4);
    let grid_rows = maps.panels.len().div_ceil(per_row);
    let (pw, ph) = (300u32, 240u32);
    // At least three panels wide, so the title fits.
    let (w, h) = (per_row.max(3) as u32 * pw, grid_rows as u32 * ph + 50);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    kv_models::check_replaceable(path)?;
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    {
        let root = BitMapBackend::new(&tmp, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(path, e))?;
        let (top, body) = root.split_vertically(50);
        top.titled(maps.title, ("sans-serif", 22))
            .map_err(|e| err(path, e))?;
        let areas = body.split_evenly((grid_rows, per_row));
        let (nc, nr) = (maps.columns.len(), maps.rows.len());
        for (panel, area) in maps.panels.iter().zip(areas) {
            let mut ctx = ChartBuilder::on(&area)
                .caption(&panel.title, ("sans-serif", 15))
                .margin(6)
                .x_label_area_size(34)
                .y_label_area_size(44)
                // A usize range is inclusive as a discrete axis: 0..n-1 is n segments.
                .build_cartesian_2d((0..nc - 1).into_segmented(), (0..nr - 1).into_segmented())
                .map_err(|e| err(path, e))?;
            let label = |names: &[String], v: &SegmentValue<usize>, flip: bool| match v {
                SegmentValue::CenterOf(i) if *i < names.len() => {
                    names[if flip { names.len() - 1 - i } else { *i }].clone()
                }
                _ => String::new(),
            };
            ctx.configure_mesh()
                .disable_mesh()
                .x_labels(nc)
                .y_labels(nr)
                .x_desc(maps.x_label)
                .y_desc(maps.y_label)
                .x_label_formatter(&|v| label(&maps.columns, v, false))
                .y_label_formatter(&|v| label(&maps.rows, v, true))
                .label_style(("sans-serif", 11))
                .axis_desc_style(("sans-serif", 12))
                .draw()
                .map_err(|e| err(path, e))?;
            // The right (top) edge of the last segment is `Last`, not a segment of its own.
            let edge = |i: usize, n: usize| {
                if i + 1 >= n {
                    SegmentValue::Last
                } else {
                    SegmentValue::Exact(i + 1)
                }
            };
            ctx.draw_series(panel.cells.iter().map(|&(c, r, v)| {
                // Row 0 at the top, as depth 0% heads the usual NIAH plot.
                let y = nr - 1 - r;
                Rectangle::new(
                    [
                        (SegmentValue::Exact(c), SegmentValue::Exact(y)),
                        (edge(c, nc), edge(y, nr)),
                    ],
                    score_color(v).filled(),
                )
            }))
            .map_err(|e| err(path, e))?;
        }
        root.present().map_err(|e| err(path, e))?;
    }
    publish(&tmp, path)
}
