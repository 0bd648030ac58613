//! PNG plots of a training run, redrawn from `status.json` after every epoch: `loss.png` (the
//! weighted train loss with the auxiliary layers', and the final layer's focal / L1 / GIoU terms,
//! epoch means) and `map.png` (val mAP and mAP50 per validated epoch). plotters' bitmap backend
//! renders into a buffer with its ab_glyph text, using the DejaVu Sans shipped inside the `dejavu`
//! crate, so no system font or fontconfig is needed; the `image` crate writes the PNG.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;

use crate::TrainerError;

/// Pixel size of each plot.
pub const PLOT_SIZE: (u32, u32) = (800, 500);
/// The loss plot's file name.
pub const LOSS_PNG: &str = "loss.png";
/// The mAP plot's file name.
pub const MAP_PNG: &str = "map.png";

/// The per-epoch figures of a run (the last record of each epoch, so a resumed run that rewrote
/// an epoch shows its final value).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    /// epoch → (total, ce, bbox, giou)
    pub loss: BTreeMap<u32, [f64; 4]>,
    /// epoch → (mAP, mAP50)
    pub map: BTreeMap<u32, [f64; 2]>,
}

fn num(v: &serde_json::Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Reads the KPI records of a `status.json` (JSON lines; other lines are skipped).
pub fn read_curves(status_json: &Path) -> Result<Curves, TrainerError> {
    let text = std::fs::read_to_string(status_json)
        .map_err(|e| TrainerError::io("read", status_json, e))?;
    let mut c = Curves::default();
    for line in text.lines() {
        let Ok(rec) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(kpi) = rec.get("kpi") else { continue };
        let Some(epoch) = kpi.get("epoch").and_then(|e| e.as_u64()) else {
            continue;
        };
        let epoch = epoch as u32;
        let get = |k: &str| kpi.get(k).and_then(num);
        if let Some(l) = get("train_loss") {
            let t = |k| get(k).unwrap_or(f64::NAN);
            c.loss.insert(
                epoch,
                [
                    l,
                    t("train_loss_ce"),
                    t("train_loss_bbox"),
                    t("train_loss_giou"),
                ],
            );
        }
        if let (Some(m), Some(m50)) = (get("val_mAP"), get("val_mAP50")) {
            c.map.insert(epoch, [m, m50]);
        }
    }
    Ok(c)
}

fn register_font() {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // The bytes are a valid TrueType font; a failure would leave text undrawn, not crash.
            let _ = plotters::style::register_font("sans-serif", style, dejavu::sans::regular());
        }
    });
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> TrainerError {
    TrainerError::Draw {
        what: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A named line of (x, value) points in an RGB colour.
pub type Series<'a> = (&'a str, [u8; 3], Vec<(f64, f64)>);

/// One line chart of `series` against `x_label` (epochs, minutes), written to `path` as PNG.
pub fn chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    y_range: Option<(f64, f64)>,
) -> Result<(), TrainerError> {
    register_font();
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
        let finite = || series.iter().flat_map(|s| &s.2).filter(|p| p.1.is_finite());
        let x_max = finite().map(|p| p.0).fold(1.0, f64::max);
        let (y_lo, y_hi) = y_range.unwrap_or_else(|| {
            let hi = finite().map(|p| p.1).fold(0.0, f64::max);
            (0.0, if hi > 0.0 { hi * 1.05 } else { 1.0 })
        });
        let mut ch = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max * 1.04, y_lo..y_hi)
            .map_err(|e| draw_err(path, e))?;
        ch.configure_mesh()
            .x_labels(12)
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| draw_err(path, e))?;
        for (name, colour, pts) in series {
            let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
            let c = RGBColor(colour[0], colour[1], colour[2]);
            ch.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(|e| draw_err(path, e))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            ch.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))
                .map_err(|e| draw_err(path, e))?;
        }
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| draw_err(path, e))?;
        root.present().map_err(|e| draw_err(path, e))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).expect("buffer is w*h*3");
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| draw_err(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| draw_err(path, e))
}

/// Redraws `loss.png` and `map.png` (the latter once an epoch was validated) in `dir` from
/// `dir/status.json`; returns the files written.
pub fn training_curves(dir: &Path) -> Result<Vec<PathBuf>, TrainerError> {
    let c = read_curves(&dir.join("status.json"))?;
    let mut written = Vec::new();
    if !c.loss.is_empty() {
        let pick = |i: usize| -> Vec<(f64, f64)> {
            c.loss
                .iter()
                .map(|(&e, v)| (f64::from(e + 1), v[i]))
                .collect()
        };
        let path = dir.join(LOSS_PNG);
        chart(
            &path,
            "training loss",
            "epoch",
            "loss (epoch mean)",
            &[
                ("total (weighted, with aux)", [0, 0, 0], pick(0)),
                ("focal (ce)", [31, 119, 180], pick(1)),
                ("L1 (bbox)", [255, 127, 14], pick(2)),
                ("GIoU", [44, 160, 44], pick(3)),
            ],
            None,
        )?;
        written.push(path);
    }
    if !c.map.is_empty() {
        let pick = |i: usize| -> Vec<(f64, f64)> {
            c.map
                .iter()
                .map(|(&e, v)| (f64::from(e + 1), v[i]))
                .collect()
        };
        let path = dir.join(MAP_PNG);
        chart(
            &path,
            "validation mAP",
            "epoch",
            "COCO bbox AP",
            &[
                ("mAP", [31, 119, 180], pick(0)),
                ("mAP50", [214, 39, 40], pick(1)),
            ],
            Some((0.0, 1.0)),
        )?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_keep_the_last_record_per_epoch_and_skip_non_kpi_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("status.json");
        std::fs::write(
            &p,
            concat!(
                "{\"status\":\"STARTED\"}\n",
                "{\"kpi\":{\"epoch\":0,\"train_loss\":3.0,\"train_loss_ce\":1.0,\"train_loss_bbox\":1.0,\"train_loss_giou\":1.0,\"val_mAP\":0.1,\"val_mAP50\":0.2}}\n",
                "{\"kpi\":{\"epoch\":1,\"train_loss\":2.0,\"train_loss_ce\":0.5,\"train_loss_bbox\":0.5,\"train_loss_giou\":1.0}}\n",
                "{\"kpi\":{\"epoch\":1,\"train_loss\":1.5,\"train_loss_ce\":0.5,\"train_loss_bbox\":0.5,\"train_loss_giou\":0.5,\"val_mAP\":\"0.3\",\"val_mAP50\":\"0.6\"}}\n",
                "not json\n"
            ),
        )
        .unwrap();
        let c = read_curves(&p).unwrap();
        assert_eq!(c.loss.len(), 2);
        assert_eq!(c.loss[&1], [1.5, 0.5, 0.5, 0.5]);
        assert_eq!(c.map[&0], [0.1, 0.2]);
        assert_eq!(c.map[&1], [0.3, 0.6]);

        let files = training_curves(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        for f in files {
            let img = image::open(&f).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), PLOT_SIZE);
            // Text and lines: a good share of the pixels is not background white.
            let ink = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
            assert!(ink > 2000, "{}: {ink} non-white pixels", f.display());
            // The caption is drawn: dark pixels in the top band.
            let caption = (0..PLOT_SIZE.0)
                .flat_map(|x| (0..36).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&v| v < 100))
                .count();
            assert!(
                caption > 50,
                "{}: caption has {caption} dark pixels",
                f.display()
            );
        }
    }
}
