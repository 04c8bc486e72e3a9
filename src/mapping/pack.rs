//! Rectangle packing inside one crossbar tier.
//!
//! A tier is an `R × C` crossbar: rows take inputs, columns give outputs. A matrix block of `h` inputs and `w`
//! outputs occupies a `h × w` rectangle. Several small blocks may share a tier as long as their rectangles do not
//! overlap; they are then computed by separate MVMs of the same tier (only the driven rows and read columns differ).
//! Shelf packing (rows are cut into horizontal shelves, blocks fill a shelf left to right) is simple, deterministic
//! and near-optimal for the few distinct block shapes a model has.

use serde::{Deserialize, Serialize};

/// Free space of one tier, tracked as shelves.
#[derive(Clone, Debug, Default)]
pub struct TierSpace {
    shelves: Vec<Shelf>,
    rows_used: usize,
    cells_used: usize,
}

#[derive(Clone, Debug)]
struct Shelf {
    row0: usize,
    height: usize,
    cols_used: usize,
}

/// Where a block sits inside its tier (top-left corner of its rectangle).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Offset {
    pub row: usize,
    pub col: usize,
}

impl TierSpace {
    /// Places an `h × w` rectangle in a tier of `rows × cols`; `None` when it does not fit.
    pub fn place(&mut self, h: usize, w: usize, rows: usize, cols: usize) -> Option<Offset> {
        debug_assert!(h > 0 && w > 0);
        if h > rows || w > cols {
            return None;
        }
        // Best fit among shelves: the lowest shelf that is tall enough wastes the least height.
        let best = self
            .shelves
            .iter_mut()
            .filter(|s| h <= s.height && s.cols_used + w <= cols)
            .min_by_key(|s| s.height);
        let offset = if let Some(shelf) = best {
            let o = Offset {
                row: shelf.row0,
                col: shelf.cols_used,
            };
            shelf.cols_used += w;
            o
        } else if self.rows_used + h <= rows {
            let o = Offset {
                row: self.rows_used,
                col: 0,
            };
            self.shelves.push(Shelf {
                row0: self.rows_used,
                height: h,
                cols_used: w,
            });
            self.rows_used += h;
            o
        } else {
            return None;
        };
        self.cells_used += h * w;
        Some(offset)
    }

    /// Number of crossbar cells (row × column pairs) holding weights.
    pub fn cells_used(&self) -> usize {
        self.cells_used
    }

    /// True when nothing is placed on this tier.
    pub fn is_empty(&self) -> bool {
        self.cells_used == 0
    }
}

/// First-fit-decreasing packing of `(h, w)` rectangles into as few `rows × cols` crossbars as it finds.
/// Returns the filled crossbars and, per rectangle (input order), its crossbar index and offset.
pub fn pack_into_crossbars(
    shapes: &[(usize, usize)],
    rows: usize,
    cols: usize,
) -> (Vec<TierSpace>, Vec<(usize, Offset)>) {
    let mut order: Vec<usize> = (0..shapes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(shapes[i].0 * shapes[i].1));
    let mut bins: Vec<TierSpace> = Vec::new();
    let mut slots = vec![(0, Offset { row: 0, col: 0 }); shapes.len()];
    for i in order {
        let (h, w) = shapes[i];
        let placed = bins
            .iter_mut()
            .enumerate()
            .find_map(|(b, t)| t.place(h, w, rows, cols).map(|o| (b, o)));
        slots[i] = match placed {
            Some(slot) => slot,
            None => {
                let mut t = TierSpace::default();
                let o = t
                    .place(h, w, rows, cols)
                    .expect("a block never exceeds one crossbar");
                bins.push(t);
                (bins.len() - 1, o)
            }
        };
    }
    (bins, slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shelves_do_not_overlap_and_fill_exactly() {
        let mut t = TierSpace::default();
        let mut rects = Vec::new();
        // Four 256×256 blocks fill a 512×512 tier exactly; a fifth does not fit.
        for _ in 0..4 {
            let o = t.place(256, 256, 512, 512).unwrap();
            rects.push((o, 256, 256));
        }
        assert!(t.place(1, 1, 512, 512).is_none());
        assert_eq!(t.cells_used(), 512 * 512);
        for (i, a) in rects.iter().enumerate() {
            for b in &rects[i + 1..] {
                let disjoint_rows = a.0.row + a.1 <= b.0.row || b.0.row + b.1 <= a.0.row;
                let disjoint_cols = a.0.col + a.2 <= b.0.col || b.0.col + b.2 <= a.0.col;
                assert!(disjoint_rows || disjoint_cols, "{a:?} overlaps {b:?}");
            }
        }
    }

    #[test]
    fn ffd_packs_an_expert_of_three_small_blocks_into_one_crossbar() {
        // OLMoE-like tiny expert: gate and up 256 inputs × 128 outputs, down 128 inputs × 256 outputs.
        let (bins, slots) = pack_into_crossbars(&[(256, 128), (256, 128), (128, 256)], 512, 512);
        assert_eq!(bins.len(), 1);
        assert!(slots.iter().all(|&(b, _)| b == 0));
        assert_eq!(bins[0].cells_used(), 3 * 256 * 128);
        // A full block and a 512×1 sliver need two crossbars.
        let (bins, _) = pack_into_crossbars(&[(512, 512), (512, 1)], 512, 512);
        assert_eq!(bins.len(), 2);
    }
}
