//! Occupancy heatmap of a mapping: stacks along x, tiers along y, each crossbar coloured by the layer it serves and
//! shaded by the fraction of its cells in use.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::plot::register_font;

/// One crossbar of the grid: the layer holding most of its cells and the fraction of cells in use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cell {
    pub layer: usize,
    pub fill: f64,
}

/// A `[stack][tier]` grid of crossbars (`None` = empty).
#[derive(Clone, Debug, Default)]
pub struct OccupancyGrid {
    pub title: String,
    pub cells: Vec<Vec<Option<Cell>>>,
    /// Number of model layers (colour scale).
    pub n_layers: usize,
}

/// Writes `grid` to `<stem>.png` and `<stem>.svg`.
pub fn write_occupancy(grid: &OccupancyGrid, stem: &Path) -> Result<[PathBuf; 2]> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let size = (1100, 560);
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw(&root, grid).with_context(|| format!("drawing {}", png.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", png.display()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw(&root, grid).with_context(|| format!("drawing {}", svg.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", svg.display()))?;
    }
    Ok([png, svg])
}

/// Colour of layer `l` of `n` on a hue wheel (HSL, full saturation).
fn layer_colour(l: usize, n: usize) -> RGBColor {
    let h = l as f64 / n.max(1) as f64 * 0.85;
    let c = HSLColor(h, 0.75, 0.45).to_rgba();
    RGBColor(c.0, c.1, c.2)
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, grid: &OccupancyGrid) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    let stacks = grid.cells.len().max(1);
    let tiers = grid.cells.first().map_or(1, |r| r.len().max(1));
    let (main, legend) = root.split_horizontally(960);
    let mut ctx = ChartBuilder::on(&main)
        .caption(&grid.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(46)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..stacks as f64, 0f64..tiers as f64)
        .map_err(err)?;
    ctx.configure_mesh()
        .disable_mesh()
        .x_desc("stack")
        .y_desc("tier")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .x_label_formatter(&|v| format!("{}", v.floor() as i64))
        .y_label_formatter(&|v| format!("{}", v.floor() as i64))
        .draw()
        .map_err(err)?;
    let rects = grid.cells.iter().enumerate().flat_map(|(s, row)| {
        row.iter().enumerate().map(move |(t, c)| {
            let (x, y) = (s as f64, t as f64);
            let style = match c {
                Some(c) => layer_colour(c.layer, grid.n_layers)
                    .mix(0.2 + 0.8 * c.fill.clamp(0.0, 1.0))
                    .filled(),
                None => RGBColor(235, 235, 235).filled(),
            };
            Rectangle::new([(x, y), (x + 1.0, y + 1.0)], style)
        })
    });
    ctx.draw_series(rects).map_err(err)?;
    // Legend: one swatch per layer (at most 16 listed), plus the shading rule.
    let shown = grid.n_layers.min(16);
    for l in 0..shown {
        let y = 40 + 24 * l as i32;
        legend
            .draw(&Rectangle::new(
                [(10, y), (30, y + 16)],
                layer_colour(l, grid.n_layers).filled(),
            ))
            .map_err(err)?;
        legend
            .draw(&Text::new(
                format!("layer {l}"),
                (36, y),
                ("sans-serif", 14),
            ))
            .map_err(err)?;
    }
    let y = 48 + 24 * shown as i32;
    for (k, line) in ["shade = share of", "cells in use;", "grey = empty"]
        .iter()
        .enumerate()
    {
        legend
            .draw(&Text::new(
                *line,
                (10, y + 18 * k as i32),
                ("sans-serif", 13),
            ))
            .map_err(err)?;
    }
    Ok(())
}
