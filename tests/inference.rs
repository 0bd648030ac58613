//! End-to-end checks of `ddetr inference` and of the training plots on the tiny synthetic set
//! (64×64 images): one short 2-epoch training gives the checkpoint and the status.json whose
//! curves must be drawn; inference then writes one annotated image and one KITTI label file per
//! image, boxes inside the image and scores at or above the threshold; bad inputs give one line.
//! Every child is stopped on drop, even when a test fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use common::{
    assert_one_error_line, ddetr_bin, run, tiny_task, tiny_workdir as workdir, TINY_64, TINY_TRAIN,
    TINY_VAL_IMAGES as VAL_IMAGES,
};

/// Upper bound for one run here.
const PATIENCE: Duration = Duration::from_secs(400);

/// Inference on the tiny val set's images.
const INFER: &[&str] = &[
    "dataset.infer_data_sources={image_dir: [data/val/images], classmap: data/val/label_map.txt}",
];

const SIDE: f64 = 64.0;

/// Runs `ddetr <task> -e spec -r <results> TINY… extra…` to the end; returns (status, stderr).
fn ddetr(dir: &Path, task: &str, results: &str, extra: &[&str]) -> (ExitStatus, String) {
    let args = tiny_task(task, results, &[TINY_64, TINY_TRAIN, INFER, extra]);
    run(dir, &ddetr_bin(), args, &[], PATIENCE)
}

/// One parsed KITTI label line: (class, box, score).
fn parse_label(line: &str) -> (String, [f64; 4], f64) {
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(f.len(), 16, "16 KITTI fields: {line:?}");
    assert_eq!(
        &f[1..4],
        &["0.00", "0", "0.00"],
        "truncation, occlusion, alpha: {line:?}"
    );
    assert!(f[8..15].iter().all(|v| *v == "0.00"), "3D fields: {line:?}");
    let n = |i: usize| -> f64 { f[i].parse().unwrap() };
    (f[0].to_string(), [n(4), n(5), n(6), n(7)], n(15))
}

/// Every label line under `labels` (one file per val image), checked for format and bounds.
fn labels(labels: &Path, threshold: f64) -> Vec<(String, [f64; 4], f64)> {
    let files: Vec<PathBuf> = std::fs::read_dir(labels)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), VAL_IMAGES, "one label file per image");
    let mut all = Vec::new();
    for f in files {
        assert_eq!(f.extension().unwrap(), "txt");
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let (class, b, score) = parse_label(line);
            assert!(
                ["rectangle", "ellipse", "triangle"].contains(&class.as_str()),
                "{line}"
            );
            assert!(
                0.0 <= b[0]
                    && b[0] <= b[2]
                    && b[2] <= SIDE
                    && 0.0 <= b[1]
                    && b[1] <= b[3]
                    && b[3] <= SIDE,
                "box outside the 64×64 image: {line}"
            );
            assert!(score >= threshold - 5e-4 && score <= 1.0, "{line}");
            all.push((class, b, score));
        }
    }
    all
}

/// PNG signature and IHDR size.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn training_draws_its_curves_and_inference_writes_an_image_and_a_kitti_file_per_image() {
    let dir = workdir();
    let d = dir.path();
    let (st, err) = ddetr(d, "train", "r", &[]);
    assert!(st.success(), "train failed:\n{err}");
    // Plots after every epoch, from status.json.
    for f in ["loss.png", "map.png"] {
        assert_eq!(png_size(&d.join("r/train").join(f)), (800, 500), "{f}");
    }

    // Threshold 0: every named detection of the top num_select is written.
    let ck = "inference.checkpoint=r/train/dd_model_latest.safetensors";
    let (st, err) = ddetr(d, "inference", "r", &[ck, "inference.conf_threshold=0.0"]);
    assert!(st.success(), "inference failed:\n{err}");
    assert!(
        err.contains("annotated images in r/inference/images_annotated"),
        "{err}"
    );
    let all = labels(&d.join("r/inference/labels"), 0.0);
    assert!(!all.is_empty());
    let annotated = d.join("r/inference/images_annotated");
    let mut names: Vec<String> = std::fs::read_dir(&annotated)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut originals: Vec<String> = std::fs::read_dir(d.join("data/val/images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    originals.sort();
    assert_eq!(
        names, originals,
        "one annotated image per input, same names"
    );
    for n in &names {
        let a = image::open(annotated.join(n)).unwrap().to_rgb8();
        let o = image::open(d.join("data/val/images").join(n))
            .unwrap()
            .to_rgb8();
        assert_eq!(a.dimensions(), o.dimensions(), "{n}: original size");
        let changed = a
            .pixels()
            .zip(o.pixels())
            .filter(|(p, q)| p.0.iter().zip(q.0).any(|(x, y)| x.abs_diff(y) > 40))
            .count();
        assert!(changed > 50, "{n}: boxes drawn ({changed} pixels changed)");
    }

    // A threshold at the median score keeps about half, all at or above it.
    let mut scores: Vec<f64> = all.iter().map(|x| x.2).collect();
    scores.sort_by(f64::total_cmp);
    let t = scores[scores.len() / 2];
    let (st, err) = ddetr(
        d,
        "inference",
        "r2",
        &[ck, &format!("inference.conf_threshold={t}")],
    );
    assert!(st.success(), "{err}");
    let kept = labels(&d.join("r2/inference/labels"), t);
    assert!(
        !kept.is_empty() && kept.len() < all.len(),
        "{} of {} kept at {t}",
        kept.len(),
        all.len()
    );
}

/// Exactly one `error:` line containing `want`, exit code 2.
fn fails_with(d: &Path, extra: &[&str], want: &str) {
    let (st, err) = ddetr(d, "inference", "x", extra);
    assert_one_error_line(st, &err, 2, want);
}

#[test]
fn each_bad_inference_input_is_one_line() {
    let dir = workdir();
    let d = dir.path();
    fails_with(d, &[], "inference.checkpoint is not set");
    fails_with(
        d,
        &["inference.checkpoint=nowhere.safetensors"],
        "inference.checkpoint nowhere.safetensors does not exist",
    );
    // The inputs are checked before the checkpoint is read: any file passes the first check.
    std::fs::write(d.join("ck.safetensors"), b"").unwrap();
    let ck = "inference.checkpoint=ck.safetensors";
    std::fs::create_dir(d.join("empty")).unwrap();
    fails_with(
        d,
        &[
            ck,
            "dataset.infer_data_sources={image_dir: [empty], classmap: data/val/label_map.txt}",
        ],
        "dataset.infer_data_sources.image_dir empty holds no .jpg, .jpeg or .png image",
    );
    std::fs::write(d.join("two.txt"), "rectangle\nellipse\n").unwrap();
    fails_with(
        d,
        &[
            ck,
            "dataset.infer_data_sources={image_dir: [data/val/images], classmap: two.txt}",
        ],
        "classmap two.txt names 2 classes but the model predicts category ids 1..3",
    );
    fails_with(
        d,
        &[ck, "inference.color_map={ellipse: reddish}"],
        "inference.color_map.ellipse is \"reddish\", not a colour",
    );
    assert!(
        !d.join("x/inference").exists(),
        "nothing written on bad input"
    );
}
