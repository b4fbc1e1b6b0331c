//! The web page at `/`: its three files, compiled into the binary (the page loads nothing from
//! any other origin, and works behind a path prefix: every URL it uses is relative), and the
//! plots the server draws as SVG: the index's runs, and the explorer's histogram of rank
//! changes.
//!
//! The page builds every element with `textContent` and attributes, never from markup, so a
//! video named `<script>….mp4` or a failure message holding HTML is shown as text.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use plotters::prelude::*;

use super::App;
use super::api::{ApiError, Params, RunSummary, blocking};
use super::explorer::CHANGE_BINS;

const INDEX_HTML: &str = include_str!("page/index.html");
const PAGE_JS: &str = include_str!("page/page.js");
const PAGE_CSS: &str = include_str!("page/page.css");

/// The runs a plot draws: the latest ones.
const PLOTTED_RUNS: usize = 200;

fn text(body: &'static str, media_type: &'static str) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub async fn index(uri: Uri) -> Result<Response, ApiError> {
    Params::of(&uri, &[])?;
    Ok(text(INDEX_HTML, "text/html; charset=utf-8"))
}

pub async fn script() -> Response {
    text(PAGE_JS, "text/javascript; charset=utf-8")
}

pub async fn style() -> Response {
    text(PAGE_CSS, "text/css; charset=utf-8")
}

/// What a runs plot can show.
#[derive(Debug, Clone, Copy)]
enum Metric {
    Videos,
    Failures,
    FramesPerSecond,
}

impl Metric {
    fn parse(name: &str) -> Option<Metric> {
        match name {
            "videos" => Some(Metric::Videos),
            "failures" => Some(Metric::Failures),
            "frames_per_s" => Some(Metric::FramesPerSecond),
            _ => None,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Metric::Videos => "videos embedded per run",
            Metric::Failures => "failed files per run",
            Metric::FramesPerSecond => "frames per second",
        }
    }

    fn of(self, run: &RunSummary) -> f64 {
        match self {
            Metric::Videos => run.videos as f64,
            Metric::Failures => run.failures as f64,
            Metric::FramesPerSecond => run.frames_per_s,
        }
    }
}

/// `GET /api/v1/plots/runs.svg?metric=videos|failures|frames_per_s`: the metric over the
/// latest runs, oldest first.
pub async fn runs_plot(State(app): State<Arc<App>>, uri: Uri) -> Result<Response, ApiError> {
    let params = Params::of(&uri, &["metric"])?;
    let metric = Metric::parse(params.required("metric")?)
        .ok_or_else(|| ApiError::bad_request("metric is one of videos, failures, frames_per_s"))?;
    let snapshot = app.live.snapshot();
    let svg = blocking(move || {
        let mut runs = app.runs.of(&snapshot);
        runs.truncate(PLOTTED_RUNS);
        runs.reverse();
        let values: Vec<f64> = runs.iter().map(|run| metric.of(run)).collect();
        draw(metric.title(), &values).map_err(|e| ApiError::internal(format!("cannot draw the plot: {e}")))
    })
    .await?;
    Ok(svg_response(svg))
}

fn svg_response(svg: String) -> Response {
    let mut response = svg.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("image/svg+xml"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /api/v1/plots/changes.svg?a=N&b=M`: how many captions' ranks `b` changed against `a`,
/// by how much, as a histogram (improved in green, worsened in red).
pub async fn changes_plot(State(app): State<Arc<App>>, uri: Uri) -> Result<Response, ApiError> {
    let params = Params::of(&uri, &["a", "b"])?;
    let (a, b) = (params.required("a")?.to_string(), params.required("b")?.to_string());
    let svg = blocking(move || {
        let comparison = app.scores.compare(&a, &b)?;
        let title = format!("rank change per caption ({} unchanged)", comparison.unchanged);
        draw_changes(&title, &comparison.histogram)
            .map_err(|e| ApiError::internal(format!("cannot draw the plot: {e}")))
    })
    .await?;
    Ok(svg_response(svg))
}

/// The histogram of rank changes: a bar per bin of [`CHANGE_BINS`], labelled by the server
/// (no text from the index is in it).
fn draw_changes(title: &str, counts: &[u64; CHANGE_BINS.len()]) -> Result<String, Box<dyn std::error::Error>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 260)).into_drawing_area();
        root.fill(&WHITE)?;
        let top = counts.iter().copied().max().unwrap_or(0).max(1);
        let top = top + top.div_ceil(8);
        // A segmented range holds its end too: bins 0 to 7 are 0..7.
        let last = CHANGE_BINS.len() as u32 - 1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d((0..last).into_segmented(), 0..top)?;
        let label = |x: &SegmentValue<u32>| match x {
            SegmentValue::CenterOf(bin) => CHANGE_BINS.get(*bin as usize).map_or(String::new(), |b| b.2.to_string()),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("rank in the first − rank in the second (above 0: improved)")
            .y_desc("captions")
            .x_labels(CHANGE_BINS.len())
            .x_label_formatter(&label)
            .y_labels(5)
            .draw()?;
        let improved = RGBColor(46, 139, 87);
        let worsened = RGBColor(200, 60, 50);
        chart.draw_series(
            Histogram::vertical(&chart)
                .margin(6)
                .style_func(|x, _| {
                    let bin = match x {
                        SegmentValue::Exact(bin) | SegmentValue::CenterOf(bin) => *bin as usize,
                        // A histogram's bars are drawn at exact bins; the range's end holds none.
                        SegmentValue::Last => 0,
                    };
                    if CHANGE_BINS[bin].0 > 0 { improved.filled() } else { worsened.filled() }
                })
                .data(counts.iter().enumerate().map(|(bin, &count)| (bin as u32, count))),
        )?;
        root.present()?;
    }
    Ok(svg)
}

/// A line of `values` by run number, as SVG. Every text in it is the server's own (a title,
/// numbers), none from the index.
fn draw(title: &str, values: &[f64]) -> Result<String, Box<dyn std::error::Error>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (480, 240)).into_drawing_area();
        root.fill(&WHITE)?;
        let top = values.iter().copied().fold(0.0f64, f64::max).max(1.0) * 1.1;
        let runs = values.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..runs + 1.0, 0.0..top)?;
        // Runs are counted: a label only where a run is.
        let whole = |x: &f64| if x.fract() == 0.0 && (1.0..=runs).contains(x) { format!("{x}") } else { String::new() };
        chart
            .configure_mesh()
            .x_desc("run, oldest first")
            .max_light_lines(0)
            .x_labels(10)
            .x_label_formatter(&whole)
            .y_labels(5)
            .draw()?;
        let points = values.iter().enumerate().map(|(i, &v)| (i as f64 + 1.0, v));
        chart.draw_series(LineSeries::new(points.clone(), &BLUE))?;
        chart.draw_series(points.map(|p| Circle::new(p, 3, BLUE.filled())))?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plot_is_svg_with_a_point_per_run() {
        let svg = draw("frames per second", &[10.0, 12.5, 0.0]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(draw("none yet", &[]).unwrap().starts_with("<svg"));
        let histogram = draw_changes("changes", &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        assert!(histogram.starts_with("<svg") && histogram.contains("+10…+99"), "{histogram}");
        for runs in [1, 2, 7, 200] {
            let values: Vec<f64> = (0..runs).map(|r| f64::from(r) * 1.5).collect();
            assert_eq!(draw("videos", &values).unwrap().matches("<circle").count(), runs as usize);
        }
    }
}
