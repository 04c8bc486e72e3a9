//! Plot helpers render PNG + SVG with the embedded font on a bare machine.
use aimc::report::{write_heatmap, write_line_chart, Heatmap, Legend, LineChart, Series};
use ndarray::Array2;

#[test]
fn line_chart_and_heatmap_write_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let chart = LineChart {
        title: "test".into(),
        x_label: "t (s)".into(),
        y_label: "g (µS)".into(),
        log_x: true,
        log_y: false,
        legend: Legend::UpperRight,
        series: vec![Series {
            label: "a".into(),
            points: vec![(1.0, 2.0), (10.0, 1.5), (100.0, 1.0)],
            band: Some(vec![(1.0, 1.8, 2.2), (10.0, 1.3, 1.7), (100.0, 0.8, 1.2)]),
        }],
    };
    let [png, svg] = write_line_chart(&chart, &dir.path().join("line")).unwrap();
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("<svg") && text.contains("g (µS)"),
        "axis label rendered as text"
    );
    let map = Heatmap {
        title: "occupancy".into(),
        x_label: "tier".into(),
        y_label: "stack".into(),
        values: Array2::from_shape_fn((4, 8), |(r, c)| (r * 8 + c) as f64),
    };
    let [png, svg] = write_heatmap(&map, &dir.path().join("heat")).unwrap();
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<rect"));
}
