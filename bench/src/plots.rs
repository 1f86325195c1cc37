//! The report's plots, SVG and PNG (plotters, no system libraries): goodput
//! and SLO attainment against load per policy, and TTFT / TPOT CDFs.
//! Text needs a TrueType font, found at run time (`$TANDEM_PLOT_FONT`, else
//! DejaVu Sans or any `.ttf` under /usr/share/fonts); without one the plots
//! are skipped with a warning and the report is still written.

use crate::report::{PolicyReport, Probe, Report, CAPACITY_ATTAINMENT};
use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const SIZE: (u32, u32) = (720, 440);

fn color(i: usize) -> RGBColor {
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)][i % 4]
}

fn find_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANDEM_PLOT_FONT") {
        return Some(p.into());
    }
    let dejavu = PathBuf::from("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
    if dejavu.is_file() {
        return Some(dejavu);
    }
    let mut stack = vec![PathBuf::from("/usr/share/fonts")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")) {
                return Some(path);
            }
        }
    }
    None
}

/// Registers the font once per process; the error says why plots are off.
fn font_ready() -> Result<(), String> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let path = find_font().ok_or("no TrueType font found (set TANDEM_PLOT_FONT, or install fonts-dejavu-core)")?;
            let bytes = std::fs::read(&path).map_err(|e| format!("reading font {}: {e}", path.display()))?;
            // plotters keeps registered fonts for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{} is not a usable font", path.display()))
        })
        .clone()
}

/// One line of a plot.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

struct Plot {
    file: &'static str,
    title: String,
    x: String,
    y: String,
    series: Vec<Series>,
    /// A horizontal reference line (the capacity threshold).
    rule: Option<f64>,
}

fn load_curve(r: &PolicyReport, y: &dyn Fn(&Probe) -> f64) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = match &r.capacity {
        Some(c) => c.probes.iter().map(|p| (p.load, y(p))).collect(),
        None => vec![],
    };
    if r.load > 0.0 && !points.iter().any(|p| p.0 == r.load) {
        points.push((r.load, y(&Probe::of(r.load, r))));
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

fn plots(report: &Report) -> Vec<Plot> {
    let unit = report.policies.iter().find_map(|r| r.capacity.as_ref().map(|c| c.unit.clone())).unwrap_or_else(|| "load".into());
    let kind = &report.kind;
    let closed = report.policies.iter().any(|r| r.capacity.as_ref().is_some_and(|c| c.closed()));
    let per_policy =
        |f: &dyn Fn(&PolicyReport) -> Vec<(f64, f64)>| report.policies.iter().map(|r| Series { name: r.policy.name().into(), points: f(r) }).collect();
    let cdf = |v: &[f64]| v.iter().enumerate().map(|(i, &x)| (x, i as f64 / (v.len().max(2) - 1) as f64)).collect();
    vec![
        Plot {
            file: "goodput_vs_load",
            title: format!("{kind}: goodput vs load"),
            x: unit.clone(),
            y: "goodput (tokens/s within SLO)".into(),
            series: per_policy(&|r| load_curve(r, &|p| p.goodput_tok_s)),
            rule: None,
        },
        Plot {
            file: "attainment_vs_load",
            title: format!("{kind}: SLO attainment vs load"),
            x: unit,
            // What capacity is judged by.
            y: if closed { "SLO attainment (corrected for coordinated omission)" } else { "SLO attainment" }.into(),
            series: per_policy(&|r| load_curve(r, &|p| p.judged_attainment(closed))),
            rule: Some(CAPACITY_ATTAINMENT),
        },
        Plot {
            file: "ttft_cdf",
            title: format!("{kind}: TTFT CDF"),
            x: "TTFT (ms)".into(),
            y: "fraction of sessions".into(),
            series: per_policy(&|r| cdf(&r.ttft_cdf_ms)),
            rule: None,
        },
        Plot {
            file: "tpot_cdf",
            title: format!("{kind}: TPOT CDF"),
            x: "TPOT (ms)".into(),
            y: "fraction of sessions".into(),
            series: per_policy(&|r| cdf(&r.tpot_cdf_ms)),
            rule: None,
        },
    ]
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, plot: &Plot) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing {}: {e}", plot.file);
    root.fill(&WHITE).map_err(err)?;
    let all = plot.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        (x0, x1, y1) = (x0.min(x), x1.max(x), y1.max(y));
    }
    if !x0.is_finite() {
        (x0, x1, y1) = (0.0, 1.0, 1.0);
    }
    let pad = ((x1 - x0) * 0.05).max(1e-3);
    let y1 = y1.max(plot.rule.unwrap_or(0.0)).max(1e-3) * 1.08;
    let mut chart = ChartBuilder::on(&root)
        .caption(&plot.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(64)
        .build_cartesian_2d((x0 - pad).max(0.0)..x1 + pad, 0.0..y1)
        .map_err(err)?;
    chart.configure_mesh().x_desc(plot.x.as_str()).y_desc(plot.y.as_str()).label_style(("sans-serif", 13)).draw().map_err(err)?;
    if let Some(rule) = plot.rule {
        chart.draw_series(LineSeries::new([((x0 - pad).max(0.0), rule), (x1 + pad, rule)], BLACK.mix(0.4))).map_err(err)?;
    }
    for (i, s) in plot.series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
            .map_err(err)?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
        if s.points.len() <= 40 {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(err)?;
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font(("sans-serif", 14)).draw().map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Writes `DIR/<plot>.svg` and `.png` for each plot; warns and skips when
/// no font can be found.
pub fn render(report: &Report, dir: &Path) -> Result<()> {
    if let Err(why) = font_ready() {
        eprintln!("bench: plots skipped: {why}");
        return Ok(());
    }
    for plot in plots(report) {
        let svg = dir.join(format!("{}.svg", plot.file));
        draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), &plot).with_context(|| format!("writing {}", svg.display()))?;
        let png = dir.join(format!("{}.png", plot.file));
        draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), &plot).with_context(|| format!("writing {}", png.display()))?;
    }
    Ok(())
}
