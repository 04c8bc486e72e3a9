//! Report output: charts written as PNG and SVG with an embedded font (no system fonts needed).

pub mod bars;
pub mod heatmap;
mod plot;

pub use plot::{register_font, write_line_chart, Legend, LineChart, Series};
