//! Image packing: each image file's original bytes (no re-encode) copied into the cache's heap,
//! from a folder or in one pass over a `.tar.gz`, once they are checked to decode and to have the
//! size their annotations say; images that fail the check are skipped and reported.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use super::build::none_missing;
use super::format::{SkipReport, SourceKind, SourceMeta};
use crate::coco::Checked;
use crate::error::{first_few, DatasetError, Result};
use crate::image::probe;

/// Where each image's bytes landed in the heap; `None` → not packed (or skipped, see `skip`).
pub(super) struct Packed {
    pub(super) ranges: Vec<Option<(u64, u64)>>,
    pub(super) skip: Vec<bool>,
}

impl Packed {
    /// `n` images, none packed and none skipped.
    fn none(n: usize) -> Packed {
        Packed {
            ranges: vec![None; n],
            skip: vec![false; n],
        }
    }
}

/// Appends image bytes to the heap section and hashes them as they go.
pub(super) struct HeapWriter<'a> {
    w: &'a mut BufWriter<File>,
    len: u64,
    hasher: xxhash_rust::xxh3::Xxh3,
    path: &'a Path,
}

impl<'a> HeapWriter<'a> {
    /// A heap that starts at `w`'s current position (`path` names the file in errors).
    pub(super) fn new(w: &'a mut BufWriter<File>, path: &'a Path) -> Self {
        HeapWriter {
            w,
            len: 0,
            hasher: xxhash_rust::xxh3::Xxh3::new(),
            path,
        }
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(u64, u64)> {
        let off = self.len;
        self.w
            .write_all(bytes)
            .map_err(|e| DatasetError::io(self.path, e))?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok((off, bytes.len() as u64))
    }

    /// The heap's length and checksum.
    pub(super) fn finish(self) -> (u64, u64) {
        (self.len, self.hasher.digest())
    }
}

/// Packs the images of every source that is to be packed (a tar.gz always, a folder when `pack`)
/// into `heap`, in source order. Returns where each source's images landed, the images skipped
/// (logged), and whether any source was packed.
pub(super) fn pack_sources(
    checked: &[(Checked, SourceMeta)],
    pack: bool,
    heap: &mut HeapWriter<'_>,
) -> Result<(Vec<Packed>, SkipReport, bool)> {
    let mut skipped = SkipReport::default();
    let mut packed_all: Vec<Packed> = Vec::with_capacity(checked.len());
    let mut any_packed = false;
    for (c, m) in checked {
        let packed = match m.kind {
            SourceKind::TarGz => pack_tar(&m.image_dir, &m.json_file, c, heap, &mut skipped)?,
            SourceKind::Dir if pack => pack_dir(&m.image_dir, c, heap, &mut skipped)?,
            SourceKind::Dir => Packed::none(c.images.len()),
        };
        any_packed |= m.kind == SourceKind::TarGz || pack;
        packed_all.push(packed);
    }
    if skipped.skipped > 0 {
        tracing::warn!(
            "skipped {} unreadable image(s) while packing: {}",
            skipped.skipped,
            first_few(&skipped.first, skipped.skipped as usize)
        );
    }
    Ok((packed_all, skipped, any_packed))
}

/// Checks bytes before packing them: a decodable header, the size the annotations say, and
/// an intact end (truncated files lose their end marker).
fn verify(bytes: &[u8], name: &str, width: u32, height: u32, skipped: &mut SkipReport) -> bool {
    let reason = match probe(bytes) {
        Err(reason) => Some(reason),
        Ok(info) if (info.width, info.height) != (width, height) => Some(format!(
            "is {}x{} but the annotations say {width}x{height}",
            info.width, info.height
        )),
        Ok(_) => None,
    };
    match reason {
        None => true,
        Some(r) => {
            skipped.skipped += 1;
            if skipped.first.len() < crate::error::FIRST_FEW {
                skipped.first.push(format!("{name} ({r})"));
            }
            false
        }
    }
}

fn pack_dir(
    image_dir: &Path,
    c: &Checked,
    heap: &mut HeapWriter<'_>,
    skipped: &mut SkipReport,
) -> Result<Packed> {
    let mut p = Packed::none(c.images.len());
    for (i, im) in c.images.iter().enumerate() {
        let path = image_dir.join(&im.file_name);
        let bytes = fs::read(&path).map_err(|e| DatasetError::io(&path, e))?;
        if verify(&bytes, &im.file_name, im.width, im.height, skipped) {
            p.ranges[i] = Some(heap.push(&bytes)?);
        } else {
            p.skip[i] = true;
        }
    }
    Ok(p)
}

/// One sequential pass over the archive (gzip cannot seek). An entry matches an image when its
/// path, with leading folders removed one by one, equals the image's `file_name`.
fn pack_tar(
    tar_path: &Path,
    json: &Path,
    c: &Checked,
    heap: &mut HeapWriter<'_>,
    skipped: &mut SkipReport,
) -> Result<Packed> {
    let by_name: HashMap<&str, usize> = c
        .images
        .iter()
        .enumerate()
        .map(|(i, im)| (im.file_name.as_str(), i))
        .collect();
    let mut p = Packed::none(c.images.len());
    let file = File::open(tar_path).map_err(|e| DatasetError::io(tar_path, e))?;
    let gz = flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 20, file));
    let mut archive = tar::Archive::new(gz);
    let bad = |e: std::io::Error| DatasetError::BadSource {
        path: tar_path.into(),
        message: format!("cannot read the archive: {e}"),
    };
    let mut buf = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let entry_path = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let mut key = entry_path.trim_start_matches("./");
        let idx = loop {
            if let Some(&i) = by_name.get(key) {
                break Some(i);
            }
            match key.split_once('/') {
                Some((_, rest)) => key = rest,
                None => break None,
            }
        };
        let Some(i) = idx else { continue };
        if p.ranges[i].is_some() || p.skip[i] {
            continue; // a later duplicate entry of the same name: the first one wins
        }
        buf.clear();
        entry.read_to_end(&mut buf).map_err(bad)?;
        let im = &c.images[i];
        if verify(&buf, &im.file_name, im.width, im.height, skipped) {
            p.ranges[i] = Some(heap.push(&buf)?);
        } else {
            p.skip[i] = true;
        }
    }
    let missing: Vec<&str> = c
        .images
        .iter()
        .enumerate()
        .filter(|(i, _)| p.ranges[*i].is_none() && !p.skip[*i])
        .map(|(_, im)| im.file_name.as_str())
        .collect();
    none_missing(json, tar_path, &missing)?;
    Ok(p)
}
