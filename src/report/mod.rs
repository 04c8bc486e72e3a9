//! Report output: charts written as PNG and SVG with an embedded font (no system fonts needed).

mod plot;

pub use plot::{register_font, write_line_chart, Legend, LineChart, Series};
