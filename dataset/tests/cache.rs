//! The dataset cache against its sources: records equal the JSON, folder and tar.gz sources give
//! the same cache, every bad input gives its one-line message, stale or damaged caches are rebuilt,
//! and the local-rank lock protocol builds once.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ddetr_dataset::cache::{self, Cache, CacheOptions};
use ddetr_dataset::synth::{self, SynthOptions};
use ddetr_dataset::{DataSource, DatasetError};
use serde_json::{json, Value};

fn synth_set(dir: &Path, images: usize, seed: u64, tar: bool) -> PathBuf {
    let out = dir.join(format!("set{seed}"));
    synth::generate(
        &out,
        &SynthOptions {
            images,
            width: 96,
            height: 72,
            classes: 3,
            seed,
            tar,
            ..Default::default()
        },
    )
    .unwrap();
    out
}

fn source(dir: &Path) -> DataSource {
    DataSource {
        image_dir: dir.join("images").display().to_string(),
        json_file: dir.join("annotations.json").display().to_string(),
    }
}

fn opts(path: &Path) -> CacheOptions {
    CacheOptions {
        path: Some(path.to_path_buf()),
        ..Default::default()
    }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
}

fn write_json(p: &Path, v: &Value) {
    fs::write(p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// Builds a cache from a JSON edited by `edit`, returning the error text or the cache.
fn build_edited(
    edit: impl FnOnce(&mut Value),
    num_classes: Option<u32>,
) -> Result<Cache, DatasetError> {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth_set(tmp.path(), 4, 1, false);
    let json_path = set.join("annotations.json");
    let mut v = read_json(&json_path);
    edit(&mut v);
    write_json(&json_path, &v);
    let o = CacheOptions {
        num_classes,
        ..opts(&tmp.path().join("c.ddetr-cache"))
    };
    let c = cache::build(&[source(&set)], &tmp.path().join("c.ddetr-cache"), &o);
    // keep the tempdir alive until the cache is mapped (the mapping outlives the unlink on Linux)
    c
}

#[test]
fn every_json_box_equals_its_cache_record() {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth_set(tmp.path(), 10, 3, false);
    let c = cache::build(
        &[source(&set)],
        &tmp.path().join("c.ddetr-cache"),
        &opts(&tmp.path().join("c.ddetr-cache")),
    )
    .unwrap();
    let v = read_json(&set.join("annotations.json"));
    let images = v["images"].as_array().unwrap();
    assert_eq!(c.len(), images.len());
    let anns = v["annotations"].as_array().unwrap();
    assert_eq!(c.boxes().len(), anns.len());
    for (i, im) in images.iter().enumerate() {
        let r = c.images()[i];
        assert_eq!(r.id, im["id"].as_i64().unwrap());
        assert_eq!(
            (r.width as u64, r.height as u64),
            (
                im["width"].as_u64().unwrap(),
                im["height"].as_u64().unwrap()
            )
        );
        assert_eq!(c.file_name(i), im["file_name"].as_str().unwrap());
        let mine: Vec<&Value> = anns.iter().filter(|a| a["image_id"] == im["id"]).collect();
        let boxes = c.boxes_of(i);
        assert_eq!(boxes.len(), mine.len());
        for (b, a) in boxes.iter().zip(mine) {
            let bb: Vec<f32> = a["bbox"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(b.bbox.to_vec(), bb);
            assert_eq!(b.category_id as u64, a["category_id"].as_u64().unwrap());
            assert_eq!(b.area, a["area"].as_f64().unwrap() as f32);
            assert_eq!(b.iscrowd, 0);
        }
        // Not packed: bytes come from the file.
        assert_eq!(
            c.image_bytes(i).unwrap().as_ref(),
            fs::read(set.join("images").join(c.file_name(i)))
                .unwrap()
                .as_slice()
        );
    }
    assert!(!c.is_packed());
    let names: Vec<&str> = c
        .meta()
        .categories
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["rectangle", "ellipse", "triangle"]);
    // Reopening reads the same records.
    let again = Cache::open(c.path()).unwrap();
    assert_eq!(again.images(), c.images());
    assert_eq!(again.boxes(), c.boxes());
}

#[test]
fn folder_and_tar_gz_sources_give_the_same_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth_set(tmp.path(), 8, 4, true);
    let dir_cache = cache::build(
        &[source(&set)],
        &tmp.path().join("dir.ddetr-cache"),
        &CacheOptions {
            pack_images: true,
            ..opts(&tmp.path().join("dir.ddetr-cache"))
        },
    )
    .unwrap();
    let tar_src = DataSource {
        image_dir: set.join("images.tar.gz").display().to_string(),
        json_file: set.join("annotations.json").display().to_string(),
    };
    let tar_cache = cache::build(
        &[tar_src],
        &tmp.path().join("tar.ddetr-cache"),
        &opts(&tmp.path().join("tar.ddetr-cache")),
    )
    .unwrap();
    assert!(dir_cache.is_packed() && tar_cache.is_packed());
    assert_eq!(dir_cache.len(), tar_cache.len());
    assert_eq!(dir_cache.boxes(), tar_cache.boxes());
    for i in 0..dir_cache.len() {
        let (a, b) = (dir_cache.images()[i], tar_cache.images()[i]);
        assert_eq!(
            (a.id, a.width, a.height, a.box_start, a.box_count),
            (b.id, b.width, b.height, b.box_start, b.box_count)
        );
        assert_eq!(dir_cache.file_name(i), tar_cache.file_name(i));
        let original = fs::read(set.join("images").join(dir_cache.file_name(i))).unwrap();
        assert_eq!(
            dir_cache.image_bytes(i).unwrap().as_ref(),
            original.as_slice()
        );
        assert_eq!(
            tar_cache.image_bytes(i).unwrap().as_ref(),
            original.as_slice()
        );
    }
    dir_cache.verify_heap().unwrap();
    tar_cache.verify_heap().unwrap();
}

#[test]
fn several_sources_get_unique_image_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (
        synth_set(tmp.path(), 3, 5, false),
        synth_set(tmp.path(), 4, 6, false),
    );
    let c = cache::build(
        &[source(&a), source(&b)],
        &tmp.path().join("c.ddetr-cache"),
        &opts(&tmp.path().join("c.ddetr-cache")),
    )
    .unwrap();
    let ids: Vec<i64> = c.images().iter().map(|r| r.id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 7]);
    let orig: Vec<i64> = c.images().iter().map(|r| r.orig_id).collect();
    assert_eq!(orig, [1, 2, 3, 1, 2, 3, 4]);
    assert_eq!(c.meta().sources[1].id_offset, 3);
    // Image 4 of the cache is image 1 of the second source, read from that source's folder.
    assert_eq!(c.image_path(3), b.join("images/000001.jpg"));
    let text = ddetr_dataset::inspect::summarize(&c).to_string();
    assert!(text.contains("images 7"), "{text}");
    assert!(text.contains("image ids offset by 3"), "{text}");
}

#[test]
fn malformed_json_names_the_file_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth_set(tmp.path(), 2, 1, false);
    fs::write(
        set.join("annotations.json"),
        "{\"images\": [\n {\"id\": 1 \"file_name\": \"a\"}]}",
    )
    .unwrap();
    let e = cache::build(
        &[source(&set)],
        &tmp.path().join("c"),
        &opts(&tmp.path().join("c")),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("annotations.json: malformed JSON at line 2 column 11"),
        "{e}"
    );
}

#[test]
fn a_missing_image_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth_set(tmp.path(), 3, 1, false);
    fs::remove_file(set.join("images/000002.jpg")).unwrap();
    let e = cache::build(
        &[source(&set)],
        &tmp.path().join("c"),
        &opts(&tmp.path().join("c")),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("1 image file(s) listed in the annotations are missing from"),
        "{e}"
    );
    assert!(
        e.contains(": 000002.jpg; fix file_name or image_dir"),
        "{e}"
    );
    // The same for a tar.gz source lacking an entry.
    let set2 = synth_set(tmp.path(), 2, 2, true);
    let mut v = read_json(&set2.join("annotations.json"));
    v["images"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": 99, "file_name": "nope.jpg", "width": 96, "height": 72}));
    write_json(&set2.join("annotations.json"), &v);
    let src = DataSource {
        image_dir: set2.join("images.tar.gz").display().to_string(),
        json_file: set2.join("annotations.json").display().to_string(),
    };
    let e = cache::build(
        &[src],
        &tmp.path().join("c2"),
        &opts(&tmp.path().join("c2")),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("missing from") && e.contains("images.tar.gz: nope.jpg"),
        "{e}"
    );
}

#[test]
fn bad_categories_and_num_classes_are_errors() {
    let e = build_edited(|v| v["annotations"][0]["category_id"] = json!(0), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1 annotation(s) use category_id 0, which is reserved for background"),
        "{e}"
    );
    let e = build_edited(|v| v["annotations"][1]["category_id"] = json!(17), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 annotation(s) use a category_id not listed in `categories` (annotation 2 has category_id 17)"), "{e}");
    let e = build_edited(|_| {}, Some(3)).unwrap_err().to_string();
    assert_eq!(e, "dataset.num_classes is 3 but annotations use category_id 3: set dataset.num_classes to at least 4");
    assert!(build_edited(|_| {}, Some(4)).is_ok());
}

#[test]
fn duplicate_ids_are_errors() {
    let e = build_edited(|v| v["images"][1]["id"] = json!(1), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 duplicate image id(s) (1)"), "{e}");
    let e = build_edited(|v| v["annotations"][2]["id"] = json!(1), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 duplicate annotation id(s) (1)"), "{e}");
}

#[test]
fn degenerate_boxes_are_dropped_and_outside_boxes_clipped_with_counts() {
    let c = build_edited(
        |v| {
            let anns = v["annotations"].as_array_mut().unwrap();
            anns[0]["bbox"] = json!([10, 10, 0, 5]);
            anns[1]["bbox"] = json!([10, 10, 5, -2]);
            anns[2]["bbox"] = json!([90, 60, 20, 20]); // image is 96x72
        },
        None,
    )
    .unwrap();
    let r = &c.meta().boxes;
    assert_eq!((r.degenerate, r.clipped, r.outside), (2, 1, 0));
    let text = ddetr_dataset::inspect::summarize(&c).to_string();
    assert!(
        text.contains(
            "dropped 2 box(es) with w or h <= 0: annotation 1 (w=0, h=5), annotation 2 (w=5, h=-2)"
        ),
        "{text}"
    );
    assert!(
        text.contains("clipped 1 box(es) to their image: annotation 3"),
        "{text}"
    );
    let clipped = c
        .boxes()
        .iter()
        .find(|b| b.bbox[0] == 90.0 && b.bbox[1] == 60.0)
        .unwrap();
    assert_eq!(clipped.bbox, [90.0, 60.0, 6.0, 12.0]);
}

#[test]
fn corrupt_images_are_skipped_when_packing_and_named_when_read() {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth_set(tmp.path(), 4, 1, false);
    let p = set.join("images/000003.jpg");
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let packed = cache::build(
        &[source(&set)],
        &tmp.path().join("p"),
        &CacheOptions {
            pack_images: true,
            ..opts(&tmp.path().join("p"))
        },
    )
    .unwrap();
    assert_eq!(packed.len(), 3);
    assert!(packed.images().iter().all(|r| r.id != 3));
    let s = &packed.meta().skipped_images;
    assert_eq!(s.skipped, 1);
    assert_eq!(s.first, ["000003.jpg (truncated: no end marker)"]);
    // Not packed: the cache keeps it; reading it gives an error naming the file.
    let plain = cache::build(
        &[source(&set)],
        &tmp.path().join("u"),
        &opts(&tmp.path().join("u")),
    )
    .unwrap();
    assert_eq!(plain.len(), 4);
    let bytes = plain.image_bytes(2).unwrap();
    let Err(e) =
        ddetr_dataset::image::decode_rgb8(&bytes, &plain.image_path(2).display().to_string())
    else {
        panic!("a truncated image must not decode")
    };
    let e = e.to_string();
    assert_eq!(
        e,
        format!("image {}: truncated: no end marker", p.display())
    );
}

#[test]
fn a_cache_of_another_version_or_with_a_bad_checksum_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth_set(tmp.path(), 3, 1, false);
    let path = tmp.path().join("c.ddetr-cache");
    let good = cache::ensure(&[source(&set)], &opts(&path)).unwrap();
    let records = good.images().to_vec();
    drop(good);
    let original = fs::read(&path).unwrap();

    let mut other_version = original.clone();
    other_version[8..12].copy_from_slice(&99u32.to_le_bytes());
    fs::write(&path, &other_version).unwrap();
    let e = Cache::open(&path).unwrap_err().to_string();
    assert!(
        e.contains("cache format version 99, this ddetr reads version 1; it will be rebuilt"),
        "{e}"
    );
    assert_eq!(
        cache::ensure(&[source(&set)], &opts(&path))
            .unwrap()
            .images(),
        records.as_slice()
    );

    let mut flipped = original.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xFF; // inside the metadata section
    fs::write(&path, &flipped).unwrap();
    assert!(Cache::open(&path)
        .unwrap_err()
        .to_string()
        .contains("cache is corrupt (checksum mismatch)"));
    assert_eq!(
        cache::ensure(&[source(&set)], &opts(&path))
            .unwrap()
            .images(),
        records.as_slice()
    );
    assert_eq!(fs::read(&path).unwrap().len(), original.len());

    fs::write(&path, &original[..200]).unwrap();
    assert!(Cache::open(&path)
        .unwrap_err()
        .to_string()
        .contains("truncated"));
    assert!(cache::ensure(&[source(&set)], &opts(&path)).is_ok());
}

#[test]
fn the_cache_is_rebuilt_when_a_source_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth_set(tmp.path(), 3, 1, false);
    let path = tmp.path().join("c.ddetr-cache");
    let first = cache::ensure(&[source(&set)], &opts(&path)).unwrap();
    let n = first.boxes().len();
    drop(first);
    let built = fs::metadata(&path).unwrap().modified().unwrap();
    // Unchanged sources: reused (same file).
    std::thread::sleep(Duration::from_millis(20));
    cache::ensure(&[source(&set)], &opts(&path)).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), built);
    // The JSON changes: rebuilt with the new boxes.
    let mut v = read_json(&set.join("annotations.json"));
    v["annotations"].as_array_mut().unwrap().pop();
    write_json(&set.join("annotations.json"), &v);
    let c = cache::ensure(&[source(&set)], &opts(&path)).unwrap();
    assert_eq!(c.boxes().len(), n - 1);
    // Asking for packed images rebuilds an unpacked cache.
    assert!(!c.is_packed());
    let packed = cache::ensure(
        &[source(&set)],
        &CacheOptions {
            pack_images: true,
            ..opts(&path)
        },
    )
    .unwrap();
    assert!(packed.is_packed());
    // num_classes is checked on reuse too.
    let e = cache::ensure(
        &[source(&set)],
        &CacheOptions {
            num_classes: Some(2),
            ..opts(&path)
        },
    )
    .unwrap_err();
    assert!(matches!(
        e,
        DatasetError::NumClassesTooSmall {
            num_classes: 2,
            max_category_id: 3
        }
    ));
}

#[test]
fn local_rank_zero_builds_once_while_the_others_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth_set(tmp.path(), 6, 2, true);
    let src = vec![DataSource {
        image_dir: set.join("images.tar.gz").display().to_string(),
        json_file: set.join("annotations.json").display().to_string(),
    }];
    let path = tmp.path().join("shared.ddetr-cache");
    let handles: Vec<_> = [3u32, 1, 2, 0]
        .into_iter()
        .map(|rank| {
            let (src, path) = (src.clone(), path.clone());
            std::thread::spawn(move || {
                if rank == 0 {
                    std::thread::sleep(Duration::from_millis(300)); // the waiters arrive first
                }
                let o = CacheOptions {
                    local_rank: rank,
                    wait_timeout: Duration::from_secs(60),
                    ..opts(&path)
                };
                let c = cache::ensure(&src, &o).unwrap();
                (
                    c.images().to_vec(),
                    std::os::unix::fs::MetadataExt::ino(&fs::metadata(c.path()).unwrap()),
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        results.windows(2).all(|w| w[0] == w[1]),
        "every rank maps the same cache file"
    );
    assert_eq!(results[0].0.len(), 6);
    // A waiter with nobody building gives up with a clear message.
    let lonely = CacheOptions {
        local_rank: 1,
        wait_timeout: Duration::from_millis(300),
        ..opts(&tmp.path().join("never.ddetr-cache"))
    };
    let e = cache::ensure(&src, &lonely).unwrap_err().to_string();
    assert!(
        e.contains("for local rank 0 to build the dataset cache"),
        "{e}"
    );
}

#[test]
fn the_default_path_sits_next_to_the_json_and_depends_on_every_source() {
    let a = DataSource {
        image_dir: "/d/a/images".into(),
        json_file: "/d/a/train.json".into(),
    };
    let b = DataSource {
        image_dir: "/d/b/images".into(),
        json_file: "/d/b/train.json".into(),
    };
    let pa = cache::default_path(std::slice::from_ref(&a)).unwrap();
    let pab = cache::default_path(&[a.clone(), b]).unwrap();
    assert_eq!(pa.parent().unwrap(), Path::new("/d/a"));
    assert!(
        pa.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("train.")
            && pa.extension().unwrap() == "ddetr-cache"
    );
    assert_ne!(pa, pab);
}

#[test]
fn an_unwritable_cache_folder_points_to_ddetr_cache_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let set = synth_set(tmp.path(), 2, 1, false);
    fs::write(tmp.path().join("not-a-dir"), b"").unwrap();
    let path = tmp.path().join("not-a-dir/c.ddetr-cache");
    let e = cache::ensure(&[source(&set)], &opts(&path))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cannot write the dataset cache in ")
            && e.ends_with("; set DDETR_CACHE_DIR to a writable folder"),
        "{e}"
    );
}
