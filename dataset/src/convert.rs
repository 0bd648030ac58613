//! `ddetr convert`: TAO's KITTI → sharded COCO JSON (`nvidia_tao_pytorch/cv/deformable_detr/utils/converter.py`,
//! `KITTIConverter`), driven by the spec's `convert` section.
//!
//! For each dataset root listed in `input_source` (relative to `data_root`): the images with
//! `image_extension` under `image_dir_name` are split into partitions (one, or with
//! `partition_mode: random` exactly two: fold 0 = the first `val_split`% for validation, fold 1 the
//! rest), each partition shuffled and cut into `num_shards` shards (the last takes the remainder),
//! and every shard written to `results_dir/<name>/<name>[-fold-PPP-of-NNN]-shard-SSSSS-of-NNNNN.json`.
//! KITTI label lines (15 fields) map their lower-cased class through `mapping_path` (a JSON object
//! `{kitti_class: target_class}`); unmapped classes and boxes without positive area are skipped and
//! counted. Image and annotation ids continue across sources and across runs through
//! `results_dir/stats.txt` (`name,next_image_id,next_annotation_id` per line), as in TAO.
//!
//! Differences from TAO, on purpose: files are listed in sorted order and shuffled with ddetr's
//! generator (seed 42) rather than Python's, so the split is deterministic but not TAO's exact
//! split; without `mapping_path` every class maps to itself (TAO falls back to PeopleNet's classes);
//! category ids are 1.. in sorted order of the target class names; image sizes come from the file
//! header (TAO applies EXIF rotation first); `num_shards: 0` writes one `.json` file per partition.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{ConvertConfig, PartitionMode};
use crate::error::{DatasetError, Result};
use crate::rng::Rng;

const SHUFFLE_SEED: u64 = 42;
const KITTI_FIELDS: usize = 15;

/// What a conversion wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConvertSummary {
    pub files: Vec<PathBuf>,
    pub images: u64,
    pub annotations: u64,
    /// Objects whose class is not in the mapping.
    pub unmapped: u64,
    /// Objects with x1 >= x2 or y1 >= y2.
    pub invalid: u64,
    /// Target class → category id.
    pub categories: BTreeMap<String, u32>,
}

#[derive(Serialize)]
struct ShardJson<'a> {
    images: Vec<ImageJson>,
    annotations: Vec<AnnJson>,
    categories: &'a [CategoryJson],
}

#[derive(Serialize)]
struct ImageJson {
    id: u64,
    file_name: String,
    height: u32,
    width: u32,
}

#[derive(Serialize)]
struct AnnJson {
    image_id: u64,
    category_id: u32,
    id: u64,
    bbox: [f64; 4],
    area: f64,
    iscrowd: u8,
}

#[derive(Serialize, Clone)]
struct CategoryJson {
    supercategory: String,
    id: u32,
    name: String,
}

fn required<'a>(v: &'a Option<String>, key: &str) -> Result<&'a str> {
    v.as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| DatasetError::InvalidArgument(format!("convert.{key} is required")))
}

fn bad_label(path: &Path, message: String) -> DatasetError {
    DatasetError::BadSource {
        path: path.to_path_buf(),
        message,
    }
}

/// Runs the conversion described by the spec's `convert` section.
pub fn convert(cfg: &ConvertConfig) -> Result<ConvertSummary> {
    let input_source = required(&cfg.input_source, "input_source")?;
    let results_dir = PathBuf::from(required(&cfg.results_dir, "results_dir")?);
    let image_dir_name = required(&cfg.image_dir_name, "image_dir_name")?;
    let label_dir_name = required(&cfg.label_dir_name, "label_dir_name")?;
    check_partitioning(cfg)?;
    let mapping = read_mapping(cfg)?;
    let sources = read_input_source(input_source)?;
    fs::create_dir_all(&results_dir).map_err(|e| DatasetError::io(&results_dir, e))?;

    // First pass over the labels: the category table (the mapping's targets, or every class seen).
    let roots = sources
        .iter()
        .map(|src| list_frames(cfg, src, image_dir_name))
        .collect::<Result<Vec<_>>>()?;
    let category_ids = category_table(&roots, &mapping, label_dir_name)?;

    let stats = results_dir.join("stats.txt");
    let (next_image, next_ann) = read_stats(&stats)?;
    let categories = category_json(&category_ids);
    let mut converter = Converter {
        cfg,
        image_dir_name,
        label_dir_name,
        mapping: &mapping,
        categories: &categories,
        next_image,
        next_ann,
        summary: ConvertSummary {
            categories: category_ids,
            ..ConvertSummary::default()
        },
    };
    let mut rng = Rng::new(SHUFFLE_SEED);
    for root in roots {
        converter.convert_source(root, &results_dir, &stats, &mut rng)?;
    }
    let summary = converter.summary;
    if summary.unmapped + summary.invalid > 0 {
        tracing::warn!(
            "convert skipped {} object(s) of unmapped classes and {} with x1 >= x2 or y1 >= y2",
            summary.unmapped,
            summary.invalid
        );
    }
    Ok(summary)
}

/// `partition_mode` with `num_partitions`, and `val_split`, are a combination this converter runs.
fn check_partitioning(cfg: &ConvertConfig) -> Result<()> {
    match (cfg.partition_mode, cfg.num_partitions) {
        (None, 0 | 1) => {}
        (Some(PartitionMode::Random), 2) => {}
        (Some(PartitionMode::Random), n) => {
            return Err(DatasetError::InvalidArgument(format!("convert.num_partitions is {n}, but partition_mode random needs exactly 2")))
        }
        (Some(PartitionMode::Sequence), _) => {
            return Err(DatasetError::InvalidArgument(
                "convert.partition_mode sequence is not supported (TAO does not implement it either): use random or leave it unset".into(),
            ))
        }
        (None, n) => return Err(DatasetError::InvalidArgument(format!("convert.num_partitions is {n}: set partition_mode: random (with 2 partitions) or use 1"))),
    }
    if cfg.val_split >= 100 {
        return Err(DatasetError::InvalidArgument(format!(
            "convert.val_split is {}: it is a percentage below 100",
            cfg.val_split
        )));
    }
    Ok(())
}

/// `mapping_path`'s `{kitti_class: target_class}` with lower-cased KITTI classes; empty without
/// one.
fn read_mapping(cfg: &ConvertConfig) -> Result<BTreeMap<String, String>> {
    Ok(match &cfg.mapping_path {
        Some(p) if !p.is_empty() => {
            let bytes = fs::read(p).map_err(|e| DatasetError::io(p, e))?;
            let m: BTreeMap<String, String> = serde_json::from_slice(&bytes).map_err(|e| DatasetError::MalformedJson {
                path: p.into(),
                line: e.line(),
                column: e.column(),
                message: "convert.mapping_path must be a JSON object {\"kitti_class\": \"target_class\"}".into(),
            })?;
            m.into_iter().map(|(k, v)| (k.to_lowercase(), v)).collect()
        }
        _ => BTreeMap::new(),
    })
}

/// The dataset folders `input_source` lists, one a line (blank lines and `#` comments skipped).
fn read_input_source(input_source: &str) -> Result<Vec<String>> {
    let sources_text =
        fs::read_to_string(input_source).map_err(|e| DatasetError::io(input_source, e))?;
    let sources: Vec<String> = sources_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if sources.is_empty() {
        return Err(DatasetError::InvalidArgument(format!(
            "convert.input_source {input_source} lists no dataset folders"
        )));
    }
    Ok(sources)
}

/// One dataset folder of `input_source` and its frames.
struct SourceRoot {
    /// As listed in `input_source` (image file names start with it).
    src: String,
    /// `src` under `data_root`.
    root: PathBuf,
    /// `src`'s last component: the output folder and file name prefix.
    name: String,
    /// File names without `image_extension`, sorted.
    frames: Vec<String>,
}

/// Lists the frames of `src`: its images with `image_extension` under `image_dir_name`.
fn list_frames(cfg: &ConvertConfig, src: &str, image_dir_name: &str) -> Result<SourceRoot> {
    let root = match &cfg.data_root {
        Some(d) if !d.is_empty() => Path::new(d).join(src),
        _ => PathBuf::from(src),
    };
    let name = Path::new(src)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| src.to_string());
    let images_dir = root.join(image_dir_name);
    let mut frames: Vec<String> = fs::read_dir(&images_dir)
        .map_err(|e| DatasetError::io(&images_dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(cfg.image_extension.as_str()))
                .map(str::to_string)
        })
        .collect();
    frames.sort();
    Ok(SourceRoot {
        src: src.to_string(),
        root,
        name,
        frames,
    })
}

/// Target class → category id (1.. in sorted order of the names): the mapping's targets, or
/// without a mapping every class the labels of `roots` use.
fn category_table(
    roots: &[SourceRoot],
    mapping: &BTreeMap<String, String>,
    label_dir_name: &str,
) -> Result<BTreeMap<String, u32>> {
    let targets: BTreeSet<String> = if mapping.is_empty() {
        let mut seen = BTreeSet::new();
        for r in roots {
            for f in &r.frames {
                for obj in read_labels(&r.root.join(label_dir_name).join(format!("{f}.txt")))? {
                    seen.insert(obj.class);
                }
            }
        }
        seen
    } else {
        mapping.values().cloned().collect()
    };
    Ok(targets
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32 + 1))
        .collect())
}

/// The `categories` array every shard carries.
fn category_json(category_ids: &BTreeMap<String, u32>) -> Vec<CategoryJson> {
    category_ids
        .iter()
        .map(|(name, &id)| CategoryJson {
            supercategory: name.clone(),
            id,
            name: name.clone(),
        })
        .collect()
}

/// The frames of one source in partitions, each shuffled: one partition, or two where fold 0 is
/// the first `val_split`% of the sorted frames.
fn partition_frames(cfg: &ConvertConfig, frames: Vec<String>, rng: &mut Rng) -> Vec<Vec<String>> {
    let parts = cfg.num_partitions.max(1) as usize;
    let mut partitions: Vec<Vec<String>> = vec![Vec::new(); parts];
    if parts == 1 {
        partitions[0] = frames;
    } else {
        let n_val = (cfg.val_split as f64 / 100.0 * frames.len() as f64) as usize;
        partitions[0] = frames[..n_val].to_vec();
        partitions[1] = frames[n_val..].to_vec();
        for p in &mut partitions {
            rng.shuffle(p);
        }
    }
    for p in &mut partitions {
        rng.shuffle(p);
    }
    partitions
}

/// The frames of shard `s` of `shards` of a partition of `len` frames: equal cuts, the last shard
/// takes the remainder.
fn shard_range(len: usize, shards: usize, s: usize) -> std::ops::Range<usize> {
    let size = len / shards;
    let end = if s + 1 < shards { (s + 1) * size } else { len };
    s * size..end
}

/// `<name>[-fold-PPP-of-NNN][-shard-SSSSS-of-NNNNN].json`: the fold only with several partitions,
/// the shard only when `num_shards` is not 0.
fn shard_file_name(name: &str, p: usize, parts: usize, s: usize, num_shards: u32) -> String {
    let mut file = name.to_string();
    if parts > 1 {
        file += &format!("-fold-{p:03}-of-{parts:03}");
    }
    if num_shards != 0 {
        file += &format!("-shard-{s:05}-of-{num_shards:05}");
    }
    format!("{file}.json")
}

/// One conversion under way: the spec's settings, the class mapping and category table, the ids
/// the next image and annotation get, and what has been written so far.
struct Converter<'a> {
    cfg: &'a ConvertConfig,
    image_dir_name: &'a str,
    label_dir_name: &'a str,
    mapping: &'a BTreeMap<String, String>,
    categories: &'a [CategoryJson],
    next_image: u64,
    next_ann: u64,
    summary: ConvertSummary,
}

impl Converter<'_> {
    /// Writes every shard of every partition of one source under `results_dir/<name>/`, then
    /// appends the ids the next source starts at to `stats`.
    fn convert_source(
        &mut self,
        root: SourceRoot,
        results_dir: &Path,
        stats: &Path,
        rng: &mut Rng,
    ) -> Result<()> {
        let cfg = self.cfg;
        let parts = cfg.num_partitions.max(1) as usize;
        let partitions = partition_frames(cfg, root.frames, rng);
        let out_dir = results_dir.join(&root.name);
        fs::create_dir_all(&out_dir).map_err(|e| DatasetError::io(&out_dir, e))?;
        let shards = cfg.num_shards.max(1) as usize;
        for (p, partition) in partitions.iter().enumerate() {
            for s in 0..shards {
                let shard = &partition[shard_range(partition.len(), shards, s)];
                let path = out_dir.join(shard_file_name(&root.name, p, parts, s, cfg.num_shards));
                self.write_shard(&root.src, &root.root, shard, &path)?;
            }
        }
        append_stats(stats, &root.name, self.next_image, self.next_ann)
    }

    /// Writes the COCO JSON of `frames` (of the source listed as `src`, found at `root`) to
    /// `path`.
    fn write_shard(
        &mut self,
        src: &str,
        root: &Path,
        frames: &[String],
        path: &Path,
    ) -> Result<()> {
        let mut json = ShardJson {
            images: Vec::new(),
            annotations: Vec::new(),
            categories: self.categories,
        };
        for frame in frames {
            let image = self.image(src, root, frame)?;
            let image_id = image.id;
            json.images.push(image);
            for obj in read_labels(&root.join(self.label_dir_name).join(format!("{frame}.txt")))? {
                if let Some(ann) = self.annotation(&obj, image_id) {
                    json.annotations.push(ann);
                }
            }
        }
        self.summary.images += json.images.len() as u64;
        self.summary.annotations += json.annotations.len() as u64;
        fs::write(
            path,
            serde_json::to_vec(&json).expect("shards always serialize"),
        )
        .map_err(|e| DatasetError::io(path, e))?;
        self.summary.files.push(path.to_path_buf());
        Ok(())
    }

    /// The image entry of `frame`, with the next image id and the size its file header says.
    fn image(&mut self, src: &str, root: &Path, frame: &str) -> Result<ImageJson> {
        let (cfg, image_dir_name) = (self.cfg, self.image_dir_name);
        let image_path = root
            .join(image_dir_name)
            .join(format!("{frame}{}", cfg.image_extension));
        let bytes = fs::read(&image_path).map_err(|e| DatasetError::io(&image_path, e))?;
        let info = crate::image::probe(&bytes).map_err(|reason| DatasetError::CorruptImage {
            name: image_path.display().to_string(),
            reason,
        })?;
        let image_id = self.next_image;
        self.next_image += 1;
        Ok(ImageJson {
            id: image_id,
            file_name: format!("{src}/{image_dir_name}/{frame}{}", cfg.image_extension),
            height: info.height,
            width: info.width,
        })
    }

    /// The annotation of one labelled object of image `image_id`, with the next annotation id;
    /// `None` (counted) for an unmapped class or a box without positive area.
    fn annotation(&mut self, obj: &KittiObject, image_id: u64) -> Option<AnnJson> {
        let target = if self.mapping.is_empty() {
            Some(&obj.class)
        } else {
            self.mapping.get(&obj.class)
        };
        let Some(target) = target else {
            self.summary.unmapped += 1;
            return None;
        };
        let [x1, y1, x2, y2] = obj.ltrb;
        if !(x1 < x2 && y1 < y2) {
            self.summary.invalid += 1;
            return None;
        }
        let bbox = [x1, y1, x2 - x1, y2 - y1];
        let ann = AnnJson {
            image_id,
            category_id: self.summary.categories[target],
            id: self.next_ann,
            bbox,
            area: bbox[2] * bbox[3],
            iscrowd: 0,
        };
        self.next_ann += 1;
        Some(ann)
    }
}

/// The ids the next source starts at: the last line of `stats.txt`, or 0 and 0.
fn read_stats(stats: &Path) -> Result<(u64, u64)> {
    let Ok(text) = fs::read_to_string(stats) else {
        return Ok((0, 0));
    };
    let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) else {
        return Ok((0, 0));
    };
    let f: Vec<&str> = last.split(',').collect();
    match (f.get(1).and_then(|v| v.trim().parse().ok()), f.get(2).and_then(|v| v.trim().parse().ok())) {
        (Some(i), Some(a)) => Ok((i, a)),
        _ => Err(bad_label(stats, format!("last line '{last}' is not name,image_id,annotation_id; delete the file to restart ids at 0"))),
    }
}

/// Appends `name,next_image,next_ann` to `stats.txt`: where the next source's ids start.
fn append_stats(stats: &Path, name: &str, next_image: u64, next_ann: u64) -> Result<()> {
    let line = format!("{name},{next_image},{next_ann}\n");
    let mut text = fs::read_to_string(stats).unwrap_or_default();
    text.push_str(&line);
    fs::write(stats, text).map_err(|e| DatasetError::io(stats, e))
}

struct KittiObject {
    class: String,
    ltrb: [f64; 4],
}

fn read_labels(path: &Path) -> Result<Vec<KittiObject>> {
    let text = fs::read_to_string(path).map_err(|e| DatasetError::io(path, e))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != KITTI_FIELDS {
            return Err(bad_label(
                path,
                format!(
                    "line {} has {} fields; KITTI labels have {KITTI_FIELDS}",
                    n + 1,
                    fields.len()
                ),
            ));
        }
        let mut ltrb = [0.0; 4];
        for (k, v) in ltrb.iter_mut().enumerate() {
            *v = fields[4 + k].parse().map_err(|_| {
                bad_label(
                    path,
                    format!(
                        "line {}: bbox field '{}' is not a number",
                        n + 1,
                        fields[4 + k]
                    ),
                )
            })?;
        }
        out.push(KittiObject {
            class: fields[0].to_lowercase(),
            ltrb,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::encode_jpeg;
    use serde_json::Value;

    /// A KITTI tree: `root/seq/images/NNN.jpg` (40x30, 50x20 for odd frames) and labels.
    fn kitti_tree(root: &Path, frames: usize) {
        fs::create_dir_all(root.join("seq/images")).unwrap();
        fs::create_dir_all(root.join("seq/labels")).unwrap();
        for i in 0..frames {
            let (w, h) = if i.is_multiple_of(2) {
                (40, 30)
            } else {
                (50, 20)
            };
            let jpeg = encode_jpeg(&vec![90u8; (w * h * 3) as usize], w, h, 80).unwrap();
            fs::write(root.join(format!("seq/images/{i:03}.jpg")), jpeg).unwrap();
            let labels = format!(
                "Car 0.00 0 -1.58 1.0 2.0 11.0 12.0 1.5 1.6 3.7 -3.6 1.7 13.4 -1.5\n\
                 Van 0.00 0 0 {i}.0 0.0 {}.5 10.0 0 0 0 0 0 0 0\n\
                 DontCare -1 -1 -10 5 5 8 8 -1 -1 -1 -1000 -1000 -1000 -10\n\
                 Pedestrian 0 0 0 10 10 10 20 0 0 0 0 0 0 0\n",
                i + 5
            );
            fs::write(root.join(format!("seq/labels/{i:03}.txt")), labels).unwrap();
        }
        fs::write(root.join("sources.txt"), "seq\n").unwrap();
        fs::write(
            root.join("mapping.json"),
            r#"{"car": "car", "van": "car", "pedestrian": "person"}"#,
        )
        .unwrap();
    }

    fn cfg(root: &Path) -> ConvertConfig {
        ConvertConfig {
            input_source: Some(root.join("sources.txt").display().to_string()),
            data_root: Some(root.display().to_string()),
            results_dir: Some(root.join("out").display().to_string()),
            image_dir_name: Some("images".into()),
            label_dir_name: Some("labels".into()),
            val_split: 20,
            num_shards: 2,
            num_partitions: 2,
            partition_mode: Some(PartitionMode::Random),
            image_extension: ".jpg".into(),
            mapping_path: Some(root.join("mapping.json").display().to_string()),
        }
    }

    fn load(p: &Path) -> Value {
        serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
    }

    #[test]
    fn a_small_kitti_tree_becomes_the_expected_shards() {
        let tmp = tempfile::tempdir().unwrap();
        kitti_tree(tmp.path(), 10);
        let s = convert(&cfg(tmp.path())).unwrap();
        let names: Vec<String> = s
            .files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "seq-fold-000-of-002-shard-00000-of-00002.json",
                "seq-fold-000-of-002-shard-00001-of-00002.json",
                "seq-fold-001-of-002-shard-00000-of-00002.json",
                "seq-fold-001-of-002-shard-00001-of-00002.json",
            ]
        );
        let shards: Vec<Value> = s.files.iter().map(|p| load(p)).collect();
        let counts: Vec<usize> = shards
            .iter()
            .map(|j| j["images"].as_array().unwrap().len())
            .collect();
        assert_eq!(counts, [1, 1, 4, 4]); // 20% of 10 = 2 for validation, 8 for training; 2 shards each
                                          // Every frame once; ids 0..10 unique; annotations per frame: car + van(→car); pedestrian has no area.
        let mut files = Vec::new();
        let mut ids = Vec::new();
        for j in &shards {
            assert_eq!(
                j["categories"],
                serde_json::json!([{"supercategory": "car", "id": 1, "name": "car"}, {"supercategory": "person", "id": 2, "name": "person"}])
            );
            for im in j["images"].as_array().unwrap() {
                files.push(im["file_name"].as_str().unwrap().to_string());
                ids.push(im["id"].as_u64().unwrap());
                let frame: usize = im["file_name"].as_str().unwrap()[11..14].parse().unwrap();
                let expect = if frame.is_multiple_of(2) {
                    (40, 30)
                } else {
                    (50, 20)
                };
                assert_eq!(
                    (
                        im["width"].as_u64().unwrap(),
                        im["height"].as_u64().unwrap()
                    ),
                    expect
                );
                let anns: Vec<&Value> = j["annotations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|a| a["image_id"] == im["id"])
                    .collect();
                assert_eq!(anns.len(), 2);
                assert_eq!(anns[0]["bbox"], serde_json::json!([1.0, 2.0, 10.0, 10.0]));
                assert_eq!(anns[0]["area"], serde_json::json!(100.0));
                assert_eq!(
                    anns[1]["bbox"],
                    serde_json::json!([frame as f64, 0.0, 5.5, 10.0])
                );
                assert!(anns
                    .iter()
                    .all(|a| a["category_id"] == 1 && a["iscrowd"] == 0));
            }
        }
        files.sort();
        assert_eq!(
            files,
            (0..10)
                .map(|i| format!("seq/images/{i:03}.jpg"))
                .collect::<Vec<_>>()
        );
        ids.sort();
        assert_eq!(ids, (0..10).collect::<Vec<u64>>());
        assert_eq!(
            (s.images, s.annotations, s.unmapped, s.invalid),
            (10, 20, 10, 10)
        );
        assert_eq!(
            fs::read_to_string(tmp.path().join("out/stats.txt")).unwrap(),
            "seq,10,20\n"
        );
        // A second run continues the ids from stats.txt, as TAO does.
        let again = convert(&cfg(tmp.path())).unwrap();
        let min_id = again
            .files
            .iter()
            .flat_map(|p| {
                load(p)["images"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i["id"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
            .min();
        assert_eq!(min_id, Some(10));
    }

    #[test]
    fn one_partition_without_mapping_keeps_every_class() {
        let tmp = tempfile::tempdir().unwrap();
        kitti_tree(tmp.path(), 3);
        let c = ConvertConfig {
            num_partitions: 1,
            partition_mode: None,
            num_shards: 0,
            mapping_path: None,
            ..cfg(tmp.path())
        };
        let s = convert(&c).unwrap();
        assert_eq!(s.files.len(), 1);
        assert!(s.files[0].ends_with("seq/seq.json"));
        let cats: Vec<&String> = s.categories.keys().collect();
        assert_eq!(cats, ["car", "dontcare", "pedestrian", "van"]);
        assert_eq!(s.annotations, 9); // car, van, dontcare per frame; the pedestrian has no width
    }

    #[test]
    fn bad_settings_and_labels_are_explained() {
        let tmp = tempfile::tempdir().unwrap();
        kitti_tree(tmp.path(), 2);
        let e = convert(&ConvertConfig {
            num_partitions: 3,
            ..cfg(tmp.path())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "convert.num_partitions is 3, but partition_mode random needs exactly 2"
        );
        let e = convert(&ConvertConfig {
            results_dir: None,
            ..cfg(tmp.path())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(e, "convert.results_dir is required");
        fs::write(tmp.path().join("seq/labels/001.txt"), "Car 0 0 0 1 2 3\n").unwrap();
        let e = convert(&cfg(tmp.path())).unwrap_err().to_string();
        assert!(
            e.ends_with("001.txt: line 1 has 7 fields; KITTI labels have 15"),
            "{e}"
        );
    }
}
