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
//! either the old cache or the new one. [`ensure()`] is the entry point of training and evaluation:
//! local rank 0 builds (or reuses) the cache under an exclusive file lock while the other local
//! ranks wait on a shared lock, then everyone maps the same file.
//!
//! One file per part: `format` (the header, records and metadata above), `open` ([`Cache`]:
//! mapping and checking a file, reading it, telling whether it is stale), `ensure` (where the file
//! lives, the lock, [`ensure_split`]), `build` ([`build()`]: checking the sources and writing the
//! file) and `pack` (copying the images into the heap). Everything public is re-exported here.

mod build;
mod ensure;
mod format;
mod open;
mod pack;

pub use build::build;
pub use ensure::{
    default_path, ensure, ensure_split, CacheOptions, Split, CACHE_DIR_ENV, EXTENSION,
};
pub use format::{
    BoxRecord, CacheMeta, ImageRecord, SkipReport, SourceKind, SourceMeta, Stamp, FORMAT_VERSION,
    MAGIC,
};
pub use open::{Cache, Staleness};
