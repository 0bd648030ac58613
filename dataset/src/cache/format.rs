//! The on-disk format of a cache file: the header, the two record tables read in place, the
//! metadata, and the checksum that covers them (the layout is drawn in [`super`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};

use crate::coco::{BoxReport, CocoCategory};
use crate::error::{DatasetError, Result};

pub const MAGIC: [u8; 8] = *b"DDETRDS\0";
pub const FORMAT_VERSION: u32 = 1;
/// Every section starts at a multiple of this.
pub(super) const SECTION_ALIGN: u64 = 64;
/// The heap starts on the first page after the header.
pub(super) const HEAP_OFFSET: u64 = 4096;
/// The `flags` bit saying the images' bytes are in the heap.
pub(super) const FLAG_PACKED: u32 = 1;

/// The first 128 bytes of the file.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(super) struct Header {
    pub(super) magic: [u8; 8],
    pub(super) version: u32,
    pub(super) flags: u32,
    pub(super) checksum: u64,
    pub(super) heap_checksum: u64,
    pub(super) heap_offset: u64,
    pub(super) heap_len: u64,
    pub(super) names_offset: u64,
    pub(super) names_len: u64,
    pub(super) boxes_offset: u64,
    pub(super) num_boxes: u64,
    pub(super) images_offset: u64,
    pub(super) num_images: u64,
    pub(super) meta_offset: u64,
    pub(super) meta_len: u64,
    pub(super) reserved: [u64; 2],
}
pub(super) const HEADER_LEN: usize = std::mem::size_of::<Header>();
const _: () = assert!(HEADER_LEN == 128);

/// One image, read in place from the mapped file.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct ImageRecord {
    /// Image id, unique across the cache's sources (the file's id plus its source's offset).
    pub id: i64,
    /// The id in the source's annotation file.
    pub orig_id: i64,
    pub name_offset: u64,
    /// Byte range of the original file in the heap; `data_len == 0` when not packed.
    pub data_offset: u64,
    pub data_len: u64,
    pub width: u32,
    pub height: u32,
    /// Range of this image's boxes in the box table.
    pub box_start: u32,
    pub box_count: u32,
    pub name_len: u32,
    /// Index into [`CacheMeta::sources`].
    pub source: u32,
}
const _: () = assert!(std::mem::size_of::<ImageRecord>() == 64);

/// One box, read in place: COCO xywh in pixels (clipped to the image).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BoxRecord {
    pub bbox: [f32; 4],
    /// The annotation's `area` (pycocotools uses it for the area ranges), or w·h when absent.
    pub area: f32,
    pub category_id: u32,
    pub iscrowd: u32,
}
const _: () = assert!(std::mem::size_of::<BoxRecord>() == 28);

/// Size and modification time of a file or folder: a source whose stamp changed is rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub mtime_ns: i128,
}

impl Stamp {
    pub fn of(path: &Path) -> Result<Stamp> {
        let m = fs::metadata(path).map_err(|e| DatasetError::io(path, e))?;
        let mtime_ns = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i128);
        Ok(Stamp {
            size: if m.is_dir() { 0 } else { m.len() },
            mtime_ns,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceKind {
    Dir,
    TarGz,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceMeta {
    /// Absolute paths as given (not canonicalized: a symlinked dataset keeps its name).
    pub image_dir: PathBuf,
    pub json_file: PathBuf,
    pub kind: SourceKind,
    pub json_stamp: Stamp,
    /// The tar.gz file's stamp, or the image folder's (its mtime changes when files come or go).
    pub images_stamp: Stamp,
    pub num_images: u64,
    pub num_boxes: u64,
    /// Added to this source's image ids to keep ids unique across sources (0 when none collide).
    pub id_offset: i64,
}

/// Images that were not packed: unreadable, truncated, or not the size their annotations say.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SkipReport {
    pub skipped: u64,
    pub first: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    pub categories: Vec<CocoCategory>,
    pub max_category_id: u32,
    pub sources: Vec<SourceMeta>,
    pub boxes: BoxReport,
    pub skipped_images: SkipReport,
}

/// xxh3-64 of the header (with its checksum field zeroed) and `sections`.
pub(super) fn checksum(header: &Header, sections: &[&[u8]]) -> u64 {
    let mut h = *header;
    h.checksum = 0;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(bytemuck::bytes_of(&h));
    for s in sections {
        hasher.update(s);
    }
    hasher.digest()
}

/// `p` made absolute (not canonicalized: a symlinked dataset keeps its name), as sources are
/// recorded and compared.
pub(super) fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| DatasetError::io(p, e))
}
