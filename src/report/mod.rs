//! Report output: line charts (log axes, ±σ bands) and heatmaps, each written as PNG and SVG
//! with an embedded font (no system fonts needed).

pub mod bars;
pub mod before_after;
pub mod heatmap;
mod plot;
pub mod task_plot;

pub use plot::{
    register_font, si_format, si_prefix, write_heatmap, write_line_chart,
    write_line_chart_with_ticks, write_png_svg, Heatmap, Legend, LineChart, Series,
};
