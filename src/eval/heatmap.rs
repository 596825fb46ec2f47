//! The needle sweep as a PNG heatmap: context lengths down, needle depths across, each cell
//! colored by its score (red 0, yellow 0.5, green 1; grey: not run) and labelled with it, the
//! figure long-context model cards publish. Drawn on an RGB canvas with an embedded font
//! (DejaVu Sans, through ab_glyph), so it needs no system fonts and no plotting backend.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};

/// What the figure shows.
pub struct Heatmap {
    pub title: String,
    /// Row labels, top to bottom (context lengths).
    pub rows: Vec<String>,
    /// Column labels, left to right (depths).
    pub columns: Vec<String>,
    /// `cells[row][column]`: a score in 0..=1, or `None` for a cell that did not run.
    pub cells: Vec<Vec<Option<f64>>>,
    pub row_axis: String,
    pub column_axis: String,
}

const CELL_W: u32 = 76;
const CELL_H: u32 = 40;
const LEFT: u32 = 100;
const TOP: u32 = 64;
const BOTTOM: u32 = 64;
const RIGHT: u32 = 24;
const BACKGROUND: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [29, 35, 43];
const NOT_RUN: [u8; 3] = [221, 226, 232];

/// The cell color of a score: red, through yellow, to green.
pub fn color(score: f64) -> [u8; 3] {
    const STOPS: [(f64, [f64; 3]); 3] = [
        (0.0, [215.0, 48.0, 39.0]),
        (0.5, [254.0, 224.0, 139.0]),
        (1.0, [26.0, 152.0, 80.0]),
    ];
    let s = score.clamp(0.0, 1.0);
    let (i, j) = if s <= 0.5 { (0, 1) } else { (1, 2) };
    let t = (s - STOPS[i].0) / (STOPS[j].0 - STOPS[i].0);
    let mut out = [0u8; 3];
    for (k, o) in out.iter_mut().enumerate() {
        *o = (STOPS[i].1[k] + t * (STOPS[j].1[k] - STOPS[i].1[k])).round() as u8;
    }
    out
}

struct Canvas {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
    font: FontRef<'static>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> anyhow::Result<Self> {
        let font = FontRef::try_from_slice(dejavu::sans::regular())
            .map_err(|e| anyhow::anyhow!("the embedded font: {e}"))?;
        let mut rgb = Vec::with_capacity((width * height * 3) as usize);
        for _ in 0..width * height {
            rgb.extend_from_slice(&BACKGROUND);
        }
        Ok(Self {
            width,
            height,
            rgb,
            font,
        })
    }

    fn blend(&mut self, x: i64, y: i64, color: [u8; 3], alpha: f32) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return;
        }
        let i = ((y as u32 * self.width + x as u32) * 3) as usize;
        for (px, &c) in self.rgb[i..i + 3].iter_mut().zip(&color) {
            let old = *px as f32;
            *px = (old + (c as f32 - old) * alpha.clamp(0.0, 1.0)).round() as u8;
        }
    }

    fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, color: [u8; 3]) {
        for yy in y..(y + h).min(self.height) {
            for xx in x..(x + w).min(self.width) {
                self.blend(xx as i64, yy as i64, color, 1.0);
            }
        }
    }

    fn text_width(&self, text: &str, px: f32) -> f32 {
        let f = self.font.as_scaled(PxScale::from(px));
        text.chars().map(|c| f.h_advance(f.glyph_id(c))).sum()
    }

    /// Draw `text` with its left end at `x` and its vertical middle at `y_mid`.
    fn text(&mut self, text: &str, x: f32, y_mid: f32, px: f32, color: [u8; 3]) {
        let scale = PxScale::from(px);
        let scaled = self.font.as_scaled(scale);
        let baseline = y_mid + (scaled.ascent() + scaled.descent()) / 2.0;
        let mut caret = x;
        let mut outlines = Vec::new();
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            let glyph = id.with_scale_and_position(scale, point(caret, baseline));
            caret += scaled.h_advance(id);
            if let Some(o) = self.font.outline_glyph(glyph) {
                outlines.push(o);
            }
        }
        for o in outlines {
            let b = o.px_bounds();
            o.draw(|gx, gy, coverage| {
                self.blend(
                    b.min.x as i64 + gx as i64,
                    b.min.y as i64 + gy as i64,
                    color,
                    coverage,
                )
            });
        }
    }

    fn centered(&mut self, text: &str, cx: f32, cy: f32, px: f32, color: [u8; 3]) {
        let w = self.text_width(text, px);
        self.text(text, cx - w / 2.0, cy, px, color);
    }

    fn png(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&self.rgb)?;
        writer.finish()?;
        Ok(out)
    }
}

/// Where cell (`row`, `column`) lies: its top-left corner.
pub fn cell_origin(row: usize, column: usize) -> (u32, u32) {
    (LEFT + column as u32 * CELL_W, TOP + row as u32 * CELL_H)
}

/// Render the heatmap as PNG bytes.
pub fn render(h: &Heatmap) -> anyhow::Result<Vec<u8>> {
    let cols = h.columns.len().max(1) as u32;
    let rows = h.rows.len().max(1) as u32;
    let height = TOP + rows * CELL_H + BOTTOM;
    // Wide enough for the grid and for the title.
    let probe = Canvas::new(1, 1)?;
    let title_w = probe.text_width(&h.title, 17.0).ceil() as u32 + 24;
    let width = (LEFT + cols * CELL_W + RIGHT).max(title_w);
    let mut c = Canvas::new(width, height)?;
    c.text(&h.title, 12.0, 22.0, 17.0, INK);
    c.text(&h.row_axis, 12.0, TOP as f32 - 14.0, 12.0, INK);
    for (r, label) in h.rows.iter().enumerate() {
        let (_, y) = cell_origin(r, 0);
        let w = c.text_width(label, 13.0);
        c.text(
            label,
            LEFT as f32 - 10.0 - w,
            (y + CELL_H / 2) as f32,
            13.0,
            INK,
        );
    }
    for (col, label) in h.columns.iter().enumerate() {
        let (x, _) = cell_origin(h.rows.len(), col);
        let y = TOP + rows * CELL_H + 14;
        c.centered(label, (x + CELL_W / 2) as f32, y as f32, 13.0, INK);
    }
    let axis_y = (TOP + rows * CELL_H + 42) as f32;
    c.centered(
        &h.column_axis,
        (LEFT + cols * CELL_W / 2) as f32,
        axis_y,
        12.0,
        INK,
    );
    for (r, row) in h.cells.iter().enumerate() {
        for (col, cell) in row.iter().enumerate() {
            let (x, y) = cell_origin(r, col);
            let fill = cell.map_or(NOT_RUN, color);
            c.fill(x + 1, y + 1, CELL_W - 2, CELL_H - 2, fill);
            let label = cell.map_or("n/a".to_string(), |s| format!("{s:.2}"));
            let cx = (x + CELL_W / 2) as f32;
            let cy = (y + CELL_H / 2) as f32;
            let ink = if cell.is_some_and(|s| !(0.25..=0.8).contains(&s)) {
                [255, 255, 255]
            } else {
                INK
            };
            c.centered(&label, cx, cy, 13.0, ink);
        }
    }
    c.png()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    #[test]
    fn cells_take_their_scores_colors_and_text_is_drawn() {
        let h = Heatmap {
            title: "qwen: needle in a haystack".into(),
            rows: vec!["512".into(), "1024".into()],
            columns: vec!["0%".into(), "50%".into(), "100%".into()],
            cells: vec![
                vec![Some(1.0), Some(0.0), None],
                vec![Some(0.5), Some(1.0), Some(1.0)],
            ],
            row_axis: "tokens".into(),
            column_axis: "needle depth".into(),
        };
        let (info, rgb) = decode(&render(&h).unwrap());
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert!(info.width >= LEFT + 3 * CELL_W + RIGHT, "{}", info.width);
        assert_eq!(info.height, TOP + 2 * CELL_H + BOTTOM);
        let px = |x: u32, y: u32| {
            let i = ((y * info.width + x) * 3) as usize;
            [rgb[i], rgb[i + 1], rgb[i + 2]]
        };
        // A corner of each cell (away from its label) has the cell's color.
        for (r, row) in h.cells.iter().enumerate() {
            for (col, cell) in row.iter().enumerate() {
                let (x, y) = cell_origin(r, col);
                assert_eq!(
                    px(x + 4, y + 4),
                    cell.map_or(NOT_RUN, color),
                    "cell {r},{col}"
                );
            }
        }
        // Text was drawn: the title's row has dark pixels, and so does a cell's middle.
        assert!((0..info.width).any(|x| px(x, 22)[0] < 100), "title");
        let (x, y) = cell_origin(1, 0);
        let middle = (x..x + CELL_W).map(|xx| px(xx, y + CELL_H / 2));
        assert!(middle.into_iter().any(|p| p != color(0.5)), "label");
    }

    #[test]
    fn the_scale_runs_red_yellow_green() {
        assert_eq!(color(0.0), [215, 48, 39]);
        assert_eq!(color(0.5), [254, 224, 139]);
        assert_eq!(color(1.0), [26, 152, 80]);
        assert_eq!(color(7.0), color(1.0));
    }
}
