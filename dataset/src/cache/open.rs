//! Opening a cache: mapping the file, checking it (magic, version, bounds, checksum), reading its
//! records in place, and telling whether it still matches its sources.

use std::borrow::Cow;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::format::{
    absolute, checksum, BoxRecord, CacheMeta, Header, ImageRecord, Stamp, FLAG_PACKED,
    FORMAT_VERSION, HEADER_LEN, MAGIC, SECTION_ALIGN,
};
use crate::config::DataSource;
use crate::error::{DatasetError, Result};

/// Why an existing cache cannot be reused (logged when rebuilding).
#[derive(Debug, Clone, PartialEq)]
pub enum Staleness {
    Fresh,
    Stale(String),
}

/// A mapped cache file.
pub struct Cache {
    path: PathBuf,
    map: memmap2::Mmap,
    header: Header,
    meta: CacheMeta,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("path", &self.path)
            .field("images", &self.header.num_images)
            .field("boxes", &self.header.num_boxes)
            .finish()
    }
}

fn corrupt(path: &Path, what: impl Into<String>) -> DatasetError {
    DatasetError::CacheCorrupt {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

impl Cache {
    /// Maps a cache file and checks its magic, format version, bounds and checksum.
    pub fn open(path: &Path) -> Result<Cache> {
        let file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
        // SAFETY: cache files are never modified in place: writers create a new file and rename it
        // over the old one, so this mapping keeps seeing the inode it opened.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DatasetError::io(path, e))?;
        if map.len() < HEADER_LEN {
            return Err(
                if map.starts_with(&MAGIC[..map.len().min(8)]) && !map.is_empty() {
                    corrupt(path, "truncated header")
                } else {
                    DatasetError::NotACache { path: path.into() }
                },
            );
        }
        let header: Header = bytemuck::pod_read_unaligned(&map[..HEADER_LEN]);
        if header.magic != MAGIC {
            return Err(DatasetError::NotACache { path: path.into() });
        }
        if header.version != FORMAT_VERSION {
            return Err(DatasetError::CacheVersion {
                path: path.into(),
                found: header.version,
                expected: FORMAT_VERSION,
            });
        }
        let len = map.len() as u64;
        let section = |off: u64, n: u64, what: &str| -> Result<std::ops::Range<usize>> {
            let end = off
                .checked_add(n)
                .filter(|&e| e <= len)
                .ok_or_else(|| corrupt(path, format!("truncated ({what} section)")))?;
            if !off.is_multiple_of(SECTION_ALIGN) {
                return Err(corrupt(path, format!("misaligned {what} section")));
            }
            Ok(off as usize..end as usize)
        };
        let heap = section(header.heap_offset, header.heap_len, "heap")?;
        let names = section(header.names_offset, header.names_len, "names")?;
        let boxes = section(
            header.boxes_offset,
            header.num_boxes * std::mem::size_of::<BoxRecord>() as u64,
            "boxes",
        )?;
        let images = section(
            header.images_offset,
            header.num_images * std::mem::size_of::<ImageRecord>() as u64,
            "images",
        )?;
        let meta_r = section(header.meta_offset, header.meta_len, "meta")?;
        let sum = checksum(
            &header,
            &[
                &map[names.clone()],
                &map[boxes.clone()],
                &map[images.clone()],
                &map[meta_r.clone()],
            ],
        );
        if sum != header.checksum {
            return Err(corrupt(path, "checksum mismatch"));
        }
        let (meta, _): (CacheMeta, usize) =
            bincode::serde::decode_from_slice(&map[meta_r], bincode::config::standard())
                .map_err(|e| corrupt(path, format!("metadata: {e}")))?;
        let cache = Cache {
            path: path.to_path_buf(),
            map,
            header,
            meta,
        };
        // Every record's ranges must lie inside their sections (checked once; reads then index freely).
        for (i, r) in cache.images().iter().enumerate() {
            let ok = (r.box_start as u64 + r.box_count as u64) <= header.num_boxes
                && r.name_offset + r.name_len as u64 <= header.names_len
                && r.data_offset + r.data_len <= header.heap_len
                && (r.source as usize) < cache.meta.sources.len()
                && std::str::from_utf8(
                    &cache.map[names.start + r.name_offset as usize..][..r.name_len as usize],
                )
                .is_ok();
            if !ok {
                return Err(corrupt(path, format!("image record {i} out of bounds")));
            }
        }
        let _ = heap;
        Ok(cache)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> &CacheMeta {
        &self.meta
    }

    pub fn len(&self) -> usize {
        self.header.num_images as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the original image bytes are in the file.
    pub fn is_packed(&self) -> bool {
        self.header.flags & FLAG_PACKED != 0
    }

    /// Size of the file in bytes, and of its image heap.
    pub fn sizes(&self) -> (u64, u64) {
        (self.map.len() as u64, self.header.heap_len)
    }

    fn section(&self, off: u64, len: u64) -> &[u8] {
        &self.map[off as usize..(off + len) as usize]
    }

    pub fn images(&self) -> &[ImageRecord] {
        let bytes = self.section(
            self.header.images_offset,
            self.header.num_images * std::mem::size_of::<ImageRecord>() as u64,
        );
        bytemuck::cast_slice(bytes)
    }

    pub fn boxes(&self) -> &[BoxRecord] {
        let bytes = self.section(
            self.header.boxes_offset,
            self.header.num_boxes * std::mem::size_of::<BoxRecord>() as u64,
        );
        bytemuck::cast_slice(bytes)
    }

    /// The boxes of image `i` (index into [`Cache::images`], not the image id).
    pub fn boxes_of(&self, i: usize) -> &[BoxRecord] {
        let r = &self.images()[i];
        &self.boxes()[r.box_start as usize..(r.box_start + r.box_count) as usize]
    }

    pub fn file_name(&self, i: usize) -> &str {
        let r = &self.images()[i];
        let names = self.section(self.header.names_offset, self.header.names_len);
        std::str::from_utf8(&names[r.name_offset as usize..][..r.name_len as usize])
            .expect("checked at open")
    }

    /// Where image `i` lives on disk when it is not packed.
    pub fn image_path(&self, i: usize) -> PathBuf {
        let r = &self.images()[i];
        self.meta.sources[r.source as usize]
            .image_dir
            .join(self.file_name(i))
    }

    /// The original bytes of image `i`: borrowed from the heap when packed, else read from disk.
    pub fn image_bytes(&self, i: usize) -> Result<Cow<'_, [u8]>> {
        let r = &self.images()[i];
        if r.data_len > 0 {
            let heap = self.section(self.header.heap_offset, self.header.heap_len);
            return Ok(Cow::Borrowed(
                &heap[r.data_offset as usize..(r.data_offset + r.data_len) as usize],
            ));
        }
        let path = self.image_path(i);
        fs::read(&path)
            .map(Cow::Owned)
            .map_err(|e| DatasetError::io(path, e))
    }

    /// Re-hashes the packed image heap against the checksum written at build.
    pub fn verify_heap(&self) -> Result<()> {
        let heap = self.section(self.header.heap_offset, self.header.heap_len);
        if xxhash_rust::xxh3::xxh3_64(heap) != self.header.heap_checksum {
            return Err(corrupt(&self.path, "image heap checksum mismatch"));
        }
        Ok(())
    }

    /// Whether this cache was built from `sources` as they are now (paths, sizes, mtimes), with the
    /// images packed when `pack` asks for it.
    pub fn staleness(&self, sources: &[DataSource], pack: bool) -> Result<Staleness> {
        if sources.len() != self.meta.sources.len() {
            return Ok(Staleness::Stale(format!(
                "{} sources now, {} when built",
                sources.len(),
                self.meta.sources.len()
            )));
        }
        for (s, m) in sources.iter().zip(&self.meta.sources) {
            let (image_dir, json) = (
                absolute(Path::new(&s.image_dir))?,
                absolute(Path::new(&s.json_file))?,
            );
            if image_dir != m.image_dir || json != m.json_file {
                return Ok(Staleness::Stale(format!(
                    "source {} is not the one the cache was built from",
                    s.json_file
                )));
            }
            if Stamp::of(&json)? != m.json_stamp {
                return Ok(Staleness::Stale(format!("{} changed", json.display())));
            }
            if Stamp::of(&image_dir)? != m.images_stamp {
                return Ok(Staleness::Stale(format!("{} changed", image_dir.display())));
            }
        }
        if pack && !self.is_packed() {
            return Ok(Staleness::Stale(
                "images are to be packed but the cache holds none".into(),
            ));
        }
        Ok(Staleness::Fresh)
    }

    /// `dataset.num_classes` must exceed the largest category id.
    pub fn check_num_classes(&self, num_classes: u32) -> Result<()> {
        if num_classes < self.meta.max_category_id + 1 {
            return Err(DatasetError::NumClassesTooSmall {
                num_classes,
                max_category_id: self.meta.max_category_id,
            });
        }
        Ok(())
    }
}
