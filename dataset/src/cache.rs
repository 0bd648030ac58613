//! The dataset cache: one file per dataset split that every rank of a node maps read-only.
//!
//! Layout (little-endian, every section 64-byte aligned, the heap page-aligned):
//!
//! ```text
//! [Header 128 B]  magic "DDETRDS\0", format version, checksum, section offsets/lengths
//! [heap]          optional: each image file's original bytes (no re-encode)
//! [names]         file names, UTF-8, concatenated
//! [boxes]         BoxRecord × num_boxes   (#[repr(C)], read in place)
//! [images]        ImageRecord × num_images (#[repr(C)], read in place)
//! [meta]          bincode(serde) CacheMeta: categories, sources with sizes/mtimes, build report
//! ```
//!
//! The checksum (xxh3-64) covers the header and every section but the heap, so opening costs a
//! hash of the tables (a few ms for COCO train) and never reads the packed images; the heap has
//! its own checksum, checked by [`Cache::verify_heap`] (`ddetr dataset inspect --verify`). The
//! file is written to a temporary name in the same folder, fsynced and renamed, so a reader sees
//! either the old cache or the new one. [`ensure`] is the entry point of training and evaluation:
//! local rank 0 builds (or reuses) the cache under an exclusive file lock while the other local
//! ranks wait on a shared lock, then everyone maps the same file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};

use crate::coco::{self, BoxReport, Checked, CocoCategory};
use crate::config::DataSource;
use crate::error::{first_few, DatasetError, Result};
use crate::image::probe;

pub const MAGIC: [u8; 8] = *b"DDETRDS\0";
pub const FORMAT_VERSION: u32 = 1;
/// Extension of cache files.
pub const EXTENSION: &str = "ddetr-cache";
/// Environment variable naming a folder for cache files (default: next to the first json_file).
pub const CACHE_DIR_ENV: &str = "DDETR_CACHE_DIR";
const SECTION_ALIGN: u64 = 64;
const HEAP_OFFSET: u64 = 4096;
const FLAG_PACKED: u32 = 1;

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct Header {
    magic: [u8; 8],
    version: u32,
    flags: u32,
    checksum: u64,
    heap_checksum: u64,
    heap_offset: u64,
    heap_len: u64,
    names_offset: u64,
    names_len: u64,
    boxes_offset: u64,
    num_boxes: u64,
    images_offset: u64,
    num_images: u64,
    meta_offset: u64,
    meta_len: u64,
    reserved: [u64; 2],
}
const HEADER_LEN: usize = std::mem::size_of::<Header>();
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

fn align(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

fn corrupt(path: &Path, what: impl Into<String>) -> DatasetError {
    DatasetError::CacheCorrupt {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn checksum(header: &Header, sections: &[&[u8]]) -> u64 {
    let mut h = *header;
    h.checksum = 0;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(bytemuck::bytes_of(&h));
    for s in sections {
        hasher.update(s);
    }
    hasher.digest()
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

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| DatasetError::io(p, e))
}

fn is_tar_gz(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.ends_with(".tar.gz") || s.ends_with(".tgz")
}

/// The default cache file for a list of sources: `<folder of the first json_file>/<its stem>.<hash>.ddetr-cache`,
/// or in `$DDETR_CACHE_DIR` when set (for read-only dataset folders). The hash covers every source's
/// absolute paths, so two splits or two source lists never share a file.
pub fn default_path(sources: &[DataSource]) -> Result<PathBuf> {
    let first = sources.first().ok_or_else(|| DatasetError::NoSources {
        split: "this".into(),
    })?;
    let json = absolute(Path::new(&first.json_file))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for s in sources {
        hasher.update(
            absolute(Path::new(&s.image_dir))?
                .as_os_str()
                .as_encoded_bytes(),
        );
        hasher.update(b"\0");
        hasher.update(
            absolute(Path::new(&s.json_file))?
                .as_os_str()
                .as_encoded_bytes(),
        );
        hasher.update(b"\0");
    }
    let stem = json
        .file_stem()
        .map_or("dataset".into(), |s| s.to_string_lossy().into_owned());
    let name = format!("{stem}.{:08x}.{EXTENSION}", hasher.digest() as u32);
    let dir = match std::env::var_os(CACHE_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => json.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    Ok(dir.join(name))
}

/// How to build or reuse a cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Cache file; `None` → [`default_path`].
    pub path: Option<PathBuf>,
    /// Pack every image's bytes into the cache (always done for tar.gz sources).
    pub pack_images: bool,
    /// `dataset.num_classes`, checked against the largest category id.
    pub num_classes: Option<u32>,
    /// Rank within the node: 0 builds, the others wait.
    pub local_rank: u32,
    /// How long a non-zero local rank waits for rank 0's build.
    pub wait_timeout: Duration,
    /// Which split, for messages ("train", "val", "test").
    pub split: String,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            path: None,
            pack_images: false,
            num_classes: None,
            local_rank: 0,
            wait_timeout: Duration::from_secs(3600),
            split: "train".into(),
        }
    }
}

/// Opens the cache for `sources`, building it first if it is missing, stale, from another format
/// version or corrupt. Local rank 0 builds under an exclusive lock on `<cache>.lock`; other local
/// ranks take a shared lock (so they block while it builds) and poll until the cache is fresh.
pub fn ensure(sources: &[DataSource], opts: &CacheOptions) -> Result<Cache> {
    if sources.is_empty() {
        return Err(DatasetError::NoSources {
            split: opts.split.clone(),
        });
    }
    let path = match &opts.path {
        Some(p) => p.clone(),
        None => default_path(sources)?,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let unwritable = |source| DatasetError::CacheDirNotWritable {
        dir: dir.clone(),
        source,
    };
    fs::create_dir_all(&dir).map_err(unwritable)?;
    let lock_path = lock_path(&path);
    let cache = if opts.local_rank == 0 {
        let lock = File::create(&lock_path).map_err(unwritable)?;
        lock.lock().map_err(|e| DatasetError::io(&lock_path, e))?;
        let reuse = match Cache::open(&path) {
            Ok(c) => match c.staleness(sources, opts.pack_images)? {
                Staleness::Fresh => Some(c),
                Staleness::Stale(why) => {
                    tracing::info!("rebuilding dataset cache {}: {why}", path.display());
                    None
                }
            },
            Err(DatasetError::Io { error: source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e @ (DatasetError::CacheVersion { .. } | DatasetError::CacheCorrupt { .. })) => {
                tracing::warn!("{e}");
                None
            }
            Err(e) => return Err(e),
        };
        let cache = match reuse {
            Some(c) => c,
            None => build(sources, &path, opts)?,
        };
        drop(lock);
        cache
    } else {
        let started = Instant::now();
        loop {
            let lock = File::options()
                .create(true)
                .append(true)
                .open(&lock_path)
                .map_err(|e| DatasetError::io(&lock_path, e))?;
            lock.lock_shared()
                .map_err(|e| DatasetError::io(&lock_path, e))?;
            if let Ok(c) = Cache::open(&path) {
                if c.staleness(sources, opts.pack_images)? == Staleness::Fresh {
                    break c;
                }
            }
            drop(lock);
            if started.elapsed() > opts.wait_timeout {
                return Err(DatasetError::CacheWaitTimeout {
                    path,
                    waited_s: started.elapsed().as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    if let Some(n) = opts.num_classes {
        cache.check_num_classes(n)?;
    }
    Ok(cache)
}

fn lock_path(cache: &Path) -> PathBuf {
    let mut s = cache.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Builds the cache for `sources` at `path` (temp file, fsync, rename) and opens it.
pub fn build(sources: &[DataSource], path: &Path, opts: &CacheOptions) -> Result<Cache> {
    let started = Instant::now();
    if sources.is_empty() {
        return Err(DatasetError::NoSources {
            split: opts.split.clone(),
        });
    }
    // 1. Parse and check every source before writing anything.
    let mut checked: Vec<(Checked, SourceMeta)> = Vec::with_capacity(sources.len());
    for s in sources {
        let (image_dir, json_file) = (
            absolute(Path::new(&s.image_dir))?,
            absolute(Path::new(&s.json_file))?,
        );
        let json_stamp = Stamp::of(&json_file)?;
        let c = coco::check(coco::read(&json_file)?, &json_file, opts.num_classes)?;
        let kind = if is_tar_gz(&image_dir) {
            SourceKind::TarGz
        } else {
            SourceKind::Dir
        };
        let images_stamp = Stamp::of(&image_dir).map_err(|e| match e {
            DatasetError::Io {
                path,
                error: source,
            } if source.kind() == std::io::ErrorKind::NotFound => DatasetError::BadSource {
                path,
                message: format!(
                    "image_dir does not exist (listed with {})",
                    json_file.display()
                ),
            },
            other => other,
        })?;
        if kind == SourceKind::Dir {
            check_files_exist(&image_dir, &json_file, &c)?;
        }
        let meta = SourceMeta {
            image_dir,
            json_file,
            kind,
            json_stamp,
            images_stamp,
            num_images: 0,
            num_boxes: 0,
            id_offset: 0,
        };
        checked.push((c, meta));
    }
    // 2. Categories agree across sources; ids unique across sources.
    let mut categories: Vec<CocoCategory> = Vec::new();
    let mut max_category_id = 0;
    let mut seen_ids = std::collections::HashSet::new();
    let mut max_id = i64::MIN;
    for (c, m) in checked.iter_mut() {
        for cat in &c.categories {
            match categories.iter().find(|k| k.id == cat.id) {
                Some(k) if k.name != cat.name => {
                    return Err(DatasetError::BadAnnotationFile {
                        json: m.json_file.clone(),
                        message: format!("category {} is '{}' here but '{}' in an earlier source; sources must agree on category ids", cat.id, cat.name, k.name),
                    })
                }
                Some(_) => {}
                None => categories.push(cat.clone()),
            }
        }
        max_category_id = max_category_id.max(c.max_category_id);
        if c.images.iter().any(|im| seen_ids.contains(&im.id)) {
            let min = c.images.iter().map(|im| im.id).min().unwrap_or(0);
            m.id_offset = max_id + 1 - min;
            tracing::info!(
                "{}: image ids collide with an earlier source; offsetting them by {}",
                m.json_file.display(),
                m.id_offset
            );
        }
        for im in &c.images {
            seen_ids.insert(im.id + m.id_offset);
            max_id = max_id.max(im.id + m.id_offset);
        }
    }
    categories.sort_by_key(|c| c.id);

    // 3. Write: heap first (sizes known only after packing), then the tables and metadata.
    let tmp = tmp_path(path);
    let result = write_cache(
        &tmp,
        &mut checked,
        categories,
        max_category_id,
        opts.pack_images,
    );
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).map_err(|e| DatasetError::io(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    let cache = Cache::open(path)?;
    tracing::info!(
        "built dataset cache {} ({} images, {} boxes) in {:.2} s",
        path.display(),
        cache.len(),
        cache.boxes().len(),
        started.elapsed().as_secs_f64()
    );
    Ok(cache)
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

fn check_files_exist(image_dir: &Path, json: &Path, c: &Checked) -> Result<()> {
    if !image_dir.is_dir() {
        return Err(DatasetError::BadSource {
            path: image_dir.into(),
            message: "image_dir is not a folder or a .tar.gz".into(),
        });
    }
    let missing: Vec<&str> = c
        .images
        .iter()
        .filter(|im| !image_dir.join(&im.file_name).is_file())
        .map(|im| im.file_name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(DatasetError::MissingImages {
            json: json.into(),
            image_dir: image_dir.into(),
            count: missing.len(),
            first: first_few(&missing, missing.len()),
        });
    }
    Ok(())
}

/// Where each image's bytes landed in the heap; `None` → not packed (or skipped, see `skip`).
struct Packed {
    ranges: Vec<Option<(u64, u64)>>,
    skip: Vec<bool>,
}

fn write_cache(
    tmp: &Path,
    checked: &mut [(Checked, SourceMeta)],
    categories: Vec<CocoCategory>,
    max_category_id: u32,
    pack: bool,
) -> Result<()> {
    let dir = tmp
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file = File::create(tmp).map_err(|source| DatasetError::CacheDirNotWritable {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| DatasetError::io(tmp, e);
    w.write_all(&[0u8; HEAP_OFFSET as usize]).map_err(io)?;
    let mut heap = HeapWriter {
        w: &mut w,
        len: 0,
        hasher: xxhash_rust::xxh3::Xxh3::new(),
        path: tmp,
    };
    let mut skipped = SkipReport::default();
    let mut packed_all: Vec<Packed> = Vec::with_capacity(checked.len());
    let mut any_packed = false;
    for (c, m) in checked.iter() {
        let packed = match m.kind {
            SourceKind::TarGz => pack_tar(&m.image_dir, &m.json_file, c, &mut heap, &mut skipped)?,
            SourceKind::Dir if pack => pack_dir(&m.image_dir, c, &mut heap, &mut skipped)?,
            SourceKind::Dir => Packed {
                ranges: vec![None; c.images.len()],
                skip: vec![false; c.images.len()],
            },
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
    let heap_len = heap.len;
    let heap_checksum = heap.hasher.digest();

    let mut names = Vec::new();
    let mut images: Vec<ImageRecord> = Vec::new();
    let mut boxes: Vec<BoxRecord> = Vec::new();
    let mut report = BoxReport::default();
    for (s, ((c, m), p)) in checked.iter_mut().zip(&packed_all).enumerate() {
        report.merge(&c.report);
        for (i, im) in c.images.iter().enumerate() {
            if p.skip[i] {
                continue;
            }
            let (data_offset, data_len) = p.ranges[i].unwrap_or((0, 0));
            images.push(ImageRecord {
                id: im.id + m.id_offset,
                orig_id: im.id,
                name_offset: names.len() as u64,
                data_offset,
                data_len,
                width: im.width,
                height: im.height,
                box_start: boxes.len() as u32,
                box_count: im.boxes.len() as u32,
                name_len: im.file_name.len() as u32,
                source: s as u32,
            });
            names.extend_from_slice(im.file_name.as_bytes());
            boxes.extend(im.boxes.iter().map(|b| BoxRecord {
                bbox: b.bbox,
                area: b.area,
                category_id: b.category_id,
                iscrowd: b.iscrowd as u32,
            }));
            m.num_images += 1;
            m.num_boxes += im.boxes.len() as u64;
        }
    }
    if boxes.len() > u32::MAX as usize {
        return Err(DatasetError::InvalidArgument(format!(
            "{} boxes exceed the cache format's limit of 2^32",
            boxes.len()
        )));
    }
    let meta = CacheMeta {
        categories,
        max_category_id,
        sources: checked.iter().map(|(_, m)| m.clone()).collect(),
        boxes: report,
        skipped_images: skipped,
    };
    let meta_bytes = bincode::serde::encode_to_vec(&meta, bincode::config::standard())
        .expect("metadata always encodes");

    let mut pos = HEAP_OFFSET + heap_len;
    let mut put = |w: &mut BufWriter<File>, bytes: &[u8]| -> Result<u64> {
        let start = align(pos, SECTION_ALIGN);
        w.write_all(&vec![0u8; (start - pos) as usize])
            .map_err(io)?;
        w.write_all(bytes).map_err(io)?;
        pos = start + bytes.len() as u64;
        Ok(start)
    };
    let names_offset = put(&mut w, &names)?;
    let boxes_bytes: &[u8] = bytemuck::cast_slice(&boxes);
    let boxes_offset = put(&mut w, boxes_bytes)?;
    let images_bytes: &[u8] = bytemuck::cast_slice(&images);
    let images_offset = put(&mut w, images_bytes)?;
    let meta_offset = put(&mut w, &meta_bytes)?;
    let mut header = Header {
        magic: MAGIC,
        version: FORMAT_VERSION,
        flags: if any_packed { FLAG_PACKED } else { 0 },
        checksum: 0,
        heap_checksum,
        heap_offset: HEAP_OFFSET,
        heap_len,
        names_offset,
        names_len: names.len() as u64,
        boxes_offset,
        num_boxes: boxes.len() as u64,
        images_offset,
        num_images: images.len() as u64,
        meta_offset,
        meta_len: meta_bytes.len() as u64,
        reserved: [0; 2],
    };
    header.checksum = checksum(&header, &[&names, boxes_bytes, images_bytes, &meta_bytes]);
    let mut file = w
        .into_inner()
        .map_err(|e| DatasetError::io(tmp, e.into_error()))?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.write_all(bytemuck::bytes_of(&header)).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(())
}

struct HeapWriter<'a> {
    w: &'a mut BufWriter<File>,
    len: u64,
    hasher: xxhash_rust::xxh3::Xxh3,
    path: &'a Path,
}

impl HeapWriter<'_> {
    fn push(&mut self, bytes: &[u8]) -> Result<(u64, u64)> {
        let off = self.len;
        self.w
            .write_all(bytes)
            .map_err(|e| DatasetError::io(self.path, e))?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok((off, bytes.len() as u64))
    }
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
    let mut p = Packed {
        ranges: vec![None; c.images.len()],
        skip: vec![false; c.images.len()],
    };
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
    let mut p = Packed {
        ranges: vec![None; c.images.len()],
        skip: vec![false; c.images.len()],
    };
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
    if !missing.is_empty() {
        return Err(DatasetError::MissingImages {
            json: json.into(),
            image_dir: tar_path.into(),
            count: missing.len(),
            first: first_few(&missing, missing.len()),
        });
    }
    Ok(p)
}

/// The dataset splits that have their own sources in the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    /// `dataset.<split>_data_sources`.
    pub fn sources(self, config: &crate::config::DatasetConfig) -> &[DataSource] {
        match self {
            Split::Train => &config.train_data_sources,
            Split::Val => &config.val_data_sources,
            Split::Test => &config.test_data_sources,
        }
    }
}

impl std::str::FromStr for Split {
    type Err = DatasetError;
    fn from_str(s: &str) -> Result<Self> {
        Split::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                DatasetError::InvalidArgument(format!(
                    "unknown split '{s}': use train, val or test"
                ))
            })
    }
}

/// The cache of one split of a spec's dataset section, with `dataset.num_classes` checked: what
/// train/evaluate call at start (every local rank; `local_rank` 0 builds).
pub fn ensure_split(
    config: &crate::config::DatasetConfig,
    split: Split,
    local_rank: u32,
    pack_images: bool,
) -> Result<Cache> {
    let opts = CacheOptions {
        num_classes: Some(config.num_classes),
        local_rank,
        pack_images,
        split: split.name().to_string(),
        ..CacheOptions::default()
    };
    ensure(split.sources(config), &opts)
}
