//! Building a cache: every source read and checked before anything is written, their categories
//! and image ids reconciled, then the file written (the packed heap first, then the tables and the
//! metadata, the header last) under a temporary name in the same folder, fsynced and renamed over
//! the old one.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::ensure::CacheOptions;
use super::format::{
    absolute, checksum, BoxRecord, CacheMeta, Header, ImageRecord, SourceKind, SourceMeta, Stamp,
    FLAG_PACKED, FORMAT_VERSION, HEAP_OFFSET, MAGIC, SECTION_ALIGN,
};
use super::open::Cache;
use super::pack::{pack_sources, HeapWriter, Packed};
use crate::coco::{self, BoxReport, Checked, CocoCategory};
use crate::config::DataSource;
use crate::error::{first_few, DatasetError, Result};

/// Builds the cache for `sources` at `path` (temp file, fsync, rename) and opens it.
pub fn build(sources: &[DataSource], path: &Path, opts: &CacheOptions) -> Result<Cache> {
    let started = Instant::now();
    if sources.is_empty() {
        return Err(DatasetError::NoSources {
            split: opts.split.clone(),
        });
    }
    // 1. Parse and check every source before writing anything.
    let mut checked = sources
        .iter()
        .map(|s| check_source(s, opts))
        .collect::<Result<Vec<_>>>()?;
    // 2. Categories agree across sources; ids unique across sources.
    let (categories, max_category_id) = reconcile_sources(&mut checked)?;
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
    replace_with(&tmp, path)?;
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

/// Reads and checks one source's annotations, checks that its images exist, and records what it
/// is (paths, kind, stamps); its counts and id offset are filled in later.
fn check_source(s: &DataSource, opts: &CacheOptions) -> Result<(Checked, SourceMeta)> {
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
    Ok((c, meta))
}

/// The categories of every source, which must agree on ids (sorted by id), and the largest
/// category id; offsets the image ids of a source whose ids collide with an earlier source's.
fn reconcile_sources(checked: &mut [(Checked, SourceMeta)]) -> Result<(Vec<CocoCategory>, u32)> {
    let mut categories: Vec<CocoCategory> = Vec::new();
    let mut max_category_id = 0;
    let mut seen_ids = HashSet::new();
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
    Ok((categories, max_category_id))
}

/// Renames the written `tmp` over `path` and syncs the folder, so a reader sees either the old
/// cache or the new one.
fn replace_with(tmp: &Path, path: &Path) -> Result<()> {
    fs::rename(tmp, path).map_err(|e| DatasetError::io(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
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
    none_missing(json, image_dir, &missing)
}

/// An error naming the first few of the `missing` images `json` lists and `image_dir` lacks.
pub(super) fn none_missing(json: &Path, image_dir: &Path, missing: &[&str]) -> Result<()> {
    if !missing.is_empty() {
        return Err(DatasetError::MissingImages {
            json: json.into(),
            image_dir: image_dir.into(),
            count: missing.len(),
            first: first_few(missing, missing.len()),
        });
    }
    Ok(())
}

/// The name table and the two record tables, in source order, without the skipped images.
struct Tables {
    names: Vec<u8>,
    images: Vec<ImageRecord>,
    boxes: Vec<BoxRecord>,
    /// Every source's box report, merged.
    report: BoxReport,
}

/// The tables for `checked`, whose images landed in the heap where `packed` says; counts each
/// source's images and boxes into its [`SourceMeta`].
fn tables(checked: &mut [(Checked, SourceMeta)], packed: &[Packed]) -> Result<Tables> {
    let mut names = Vec::new();
    let mut images: Vec<ImageRecord> = Vec::new();
    let mut boxes: Vec<BoxRecord> = Vec::new();
    let mut report = BoxReport::default();
    for (s, ((c, m), p)) in checked.iter_mut().zip(packed).enumerate() {
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
    Ok(Tables {
        names,
        images,
        boxes,
        report,
    })
}

/// Writes the cache file `tmp`: the header's room, the heap (packing images as the sources and
/// `pack` ask), the tables and metadata each [`SECTION_ALIGN`]-aligned, then the header; fsynced.
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
    let mut heap = HeapWriter::new(&mut w, tmp);
    let (packed, skipped, any_packed) = pack_sources(checked, pack, &mut heap)?;
    let (heap_len, heap_checksum) = heap.finish();

    let Tables {
        names,
        images,
        boxes,
        report,
    } = tables(checked, &packed)?;
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

fn align(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

fn is_tar_gz(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.ends_with(".tar.gz") || s.ends_with(".tgz")
}
