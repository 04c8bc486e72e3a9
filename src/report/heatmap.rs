//! Occupancy picture of a mapping: stacks along x, tiers along y; each crossbar filled from the bottom to the share
//! of its cells in use, coloured by the layer it serves, and (when the cells are large enough) labelled with the
//! layer and experts it holds.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::plot::{ticked, write_png_svg, PALETTE};

/// Font family registered by [`register_font`].
const FAMILY: &str = "sans-serif";

/// One crossbar of the grid: the layer holding most of its cells, the fraction of cells in use, and which
/// experts sit there (`L0 E3,E4`).
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub layer: usize,
    pub fill: f64,
    pub label: String,
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
    write_png_svg(stem, (1200, 640), &|r| draw(r, grid), &|r| draw(r, grid))
}

/// Colour of layer `l` of `n`: a qualitative palette for up to 10 layers, a hue wheel beyond.
fn layer_colour(l: usize, n: usize) -> RGBColor {
    // Tableau 10: the first ten colours of the shared palette (its light variants would be too pale here).
    const TABLEAU: &[(u8, u8, u8)] = PALETTE.split_at(10).0;
    if n <= TABLEAU.len() {
        let (r, g, b) = TABLEAU[l % TABLEAU.len()];
        return RGBColor(r, g, b);
    }
    let h = l as f64 / n.max(1) as f64 * 0.85;
    let c = HSLColor(h, 0.75, 0.45).to_rgba();
    RGBColor(c.0, c.1, c.2)
}

/// Tick positions at cell centres: every cell when few, else about 16 evenly spaced.
fn centre_ticks(n: usize) -> Vec<f64> {
    let step = n.div_ceil(16).max(1);
    (0..n).step_by(step).map(|i| i as f64 + 0.5).collect()
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, grid: &OccupancyGrid) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    let stacks = grid.cells.len().max(1);
    let tiers = grid.cells.first().map_or(1, |r| r.len().max(1));
    let body = root.titled(&grid.title, (FAMILY, 22)).map_err(err)?;
    let (main, legend) = body.split_horizontally(1000);
    let (xt, yt) = (centre_ticks(stacks), centre_ticks(tiers));
    let mut ctx = ChartBuilder::on(&main)
        .margin(14)
        .x_label_area_size(50)
        .y_label_area_size(56)
        .build_cartesian_2d(
            ticked(0f64..stacks as f64, xt),
            ticked(0f64..tiers as f64, yt),
        )
        .map_err(err)?;
    ctx.configure_mesh()
        .disable_mesh()
        .x_desc("stack")
        .y_desc("tier")
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .x_label_formatter(&|v| format!("{}", v.floor() as i64))
        .y_label_formatter(&|v| format!("{}", v.floor() as i64))
        .draw()
        .map_err(err)?;
    // Pixel size of one cell decides whether the experts' names fit inside it.
    let (px0, py0) = ctx.backend_coord(&(0.0, 0.0));
    let (px1, py1) = ctx.backend_coord(&(1.0, 1.0));
    let (cell_w, cell_h) = ((px1 - px0).abs(), (py1 - py0).abs());
    let labelled = cell_w >= 44 && cell_h >= 30;
    let gap = if cell_w >= 8 { 0.04 } else { 0.0 };
    for (s, row) in grid.cells.iter().enumerate() {
        for (t, c) in row.iter().enumerate() {
            let (x, y) = (s as f64, t as f64);
            // The whole crossbar in light grey; the share in use filled from the bottom in the layer's colour.
            ctx.draw_series(std::iter::once(Rectangle::new(
                [(x + gap, y + gap), (x + 1.0 - gap, y + 1.0 - gap)],
                RGBColor(232, 232, 232).filled(),
            )))
            .map_err(err)?;
            let Some(c) = c else { continue };
            let fill = c.fill.clamp(0.0, 1.0);
            let colour = layer_colour(c.layer, grid.n_layers);
            ctx.draw_series(std::iter::once(Rectangle::new(
                [
                    (x + gap, y + gap),
                    (x + 1.0 - gap, y + gap + (1.0 - 2.0 * gap) * fill),
                ],
                colour.filled(),
            )))
            .map_err(err)?;
            if labelled {
                let max_chars = (cell_w as usize / 8).max(4);
                let mut text = c.label.clone();
                if text.chars().count() > max_chars {
                    text = text.chars().take(max_chars - 1).collect::<String>() + "…";
                }
                let style = TextStyle::from((FAMILY, 13).into_font())
                    .pos(Pos::new(HPos::Center, VPos::Center));
                ctx.draw_series(std::iter::once(Text::new(
                    text,
                    (x + 0.5, y + 0.8),
                    style.clone(),
                )))
                .map_err(err)?;
                ctx.draw_series(std::iter::once(Text::new(
                    format!("{:.0}%", 100.0 * c.fill),
                    (x + 0.5, y + 0.6),
                    style,
                )))
                .map_err(err)?;
            }
        }
    }
    // Legend: one swatch per layer (at most 16 listed), then how to read a cell.
    let shown = grid.n_layers.min(16);
    let top = 60;
    for l in 0..shown {
        let y = top + 24 * l as i32;
        legend
            .draw(&Rectangle::new(
                [(10, y), (30, y + 16)],
                layer_colour(l, grid.n_layers).filled(),
            ))
            .map_err(err)?;
        legend
            .draw(&Text::new(format!("layer {l}"), (38, y), (FAMILY, 15)))
            .map_err(err)?;
    }
    if grid.n_layers > shown {
        legend
            .draw(&Text::new(
                format!("… {} layers in all", grid.n_layers),
                (10, top + 24 * shown as i32),
                (FAMILY, 14),
            ))
            .map_err(err)?;
    }
    let y = top + 24 * (shown as i32 + 1) + 10;
    let mut lines = vec![
        "Each cell is one",
        "crossbar (tier).",
        "Coloured height and %:",
        "share of its cells",
        "holding weights.",
        "Grey: free cells.",
    ];
    if labelled {
        lines.extend([
            "Text: layer and",
            "experts (E routed,",
            "S shared) it holds.",
        ]);
    }
    for (k, line) in lines.iter().enumerate() {
        legend
            .draw(&Text::new(*line, (10, y + 18 * k as i32), (FAMILY, 14)))
            .map_err(err)?;
    }
    Ok(())
}
