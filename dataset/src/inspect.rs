//! `ddetr dataset inspect`: counts, class histogram, box sizes by COCO area range, the sources
//! and what the build checks changed — computed from a mapped cache.

use std::fmt;

use crate::cache::{Cache, SourceKind};
use crate::error::first_few;
use crate::synth::area_range;

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub path: String,
    pub file_bytes: u64,
    pub heap_bytes: u64,
    pub packed: bool,
    pub images: usize,
    pub images_without_boxes: usize,
    pub boxes: usize,
    pub crowd: usize,
    /// (category id, name, boxes).
    pub classes: Vec<(i64, String, usize)>,
    /// Boxes by COCO area range of the box (w·h): small, medium, large.
    pub per_area: [usize; 3],
    pub sources: Vec<String>,
    pub notes: Vec<String>,
}

pub fn summarize(cache: &Cache) -> Summary {
    let meta = cache.meta();
    let mut per_class = vec![0usize; meta.max_category_id as usize + 1];
    let mut per_area = [0usize; 3];
    let mut crowd = 0;
    for b in cache.boxes() {
        if let Some(n) = per_class.get_mut(b.category_id as usize) {
            *n += 1;
        }
        per_area[area_range(b.bbox[2] as f64 * b.bbox[3] as f64)] += 1;
        crowd += (b.iscrowd != 0) as usize;
    }
    let classes = meta
        .categories
        .iter()
        .map(|c| {
            (
                c.id,
                c.name.clone(),
                per_class.get(c.id as usize).copied().unwrap_or(0),
            )
        })
        .collect();
    let sources = meta
        .sources
        .iter()
        .map(|s| {
            let kind = match s.kind {
                SourceKind::Dir => "folder",
                SourceKind::TarGz => "tar.gz",
            };
            let ids = if s.id_offset == 0 {
                String::new()
            } else {
                format!(", image ids offset by {}", s.id_offset)
            };
            format!(
                "{} ({kind}) + {}: {} images, {} boxes{ids}",
                s.image_dir.display(),
                s.json_file.display(),
                s.num_images,
                s.num_boxes
            )
        })
        .collect();
    let r = &meta.boxes;
    let mut notes = Vec::new();
    if r.degenerate > 0 {
        notes.push(format!(
            "dropped {} box(es) with w or h <= 0: {}",
            r.degenerate,
            first_few(&r.first_degenerate, r.degenerate as usize)
        ));
    }
    if r.clipped > 0 {
        notes.push(format!(
            "clipped {} box(es) to their image: {}",
            r.clipped,
            first_few(&r.first_clipped, r.clipped as usize)
        ));
    }
    if r.outside > 0 {
        notes.push(format!(
            "dropped {} box(es) outside their image: {}",
            r.outside,
            first_few(&r.first_outside, r.outside as usize)
        ));
    }
    let s = &meta.skipped_images;
    if s.skipped > 0 {
        notes.push(format!(
            "skipped {} unreadable image(s): {}",
            s.skipped,
            first_few(&s.first, s.skipped as usize)
        ));
    }
    let (file_bytes, heap_bytes) = cache.sizes();
    Summary {
        path: cache.path().display().to_string(),
        file_bytes,
        heap_bytes,
        packed: cache.is_packed(),
        images: cache.len(),
        images_without_boxes: cache.images().iter().filter(|r| r.box_count == 0).count(),
        boxes: cache.boxes().len(),
        crowd,
        classes,
        per_area,
        sources,
        notes,
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn pct(n: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * n as f64 / total as f64
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let packed = if self.packed {
            format!("images packed ({:.1} MiB)", mib(self.heap_bytes))
        } else {
            "images read from their files".into()
        };
        writeln!(
            f,
            "cache {} ({:.1} MiB, {packed})",
            self.path,
            mib(self.file_bytes)
        )?;
        writeln!(
            f,
            "images {} ({} without boxes), boxes {} ({} crowd)",
            self.images, self.images_without_boxes, self.boxes, self.crowd
        )?;
        writeln!(f, "sources:")?;
        for s in &self.sources {
            writeln!(f, "  {s}")?;
        }
        writeln!(f, "classes (id name boxes):")?;
        for (id, name, n) in &self.classes {
            writeln!(
                f,
                "  {id:>4} {name:<20} {n:>9} ({:.1}%)",
                pct(*n, self.boxes)
            )?;
        }
        writeln!(f, "box sizes (COCO area ranges of w*h):")?;
        for (label, n) in ["small  (< 32^2)", "medium (< 96^2)", "large  (>= 96^2)"]
            .iter()
            .zip(self.per_area)
        {
            writeln!(f, "  {label:<17} {n:>9} ({:.1}%)", pct(n, self.boxes))?;
        }
        if self.notes.is_empty() {
            writeln!(f, "build checks: nothing dropped, clipped or skipped")?;
        } else {
            for n in &self.notes {
                writeln!(f, "build checks: {n}")?;
            }
        }
        Ok(())
    }
}
