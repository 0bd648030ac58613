//! `ddetr inference -e spec inference.checkpoint=…`: annotated images and KITTI label files for
//! every image of `dataset.infer_data_sources`.

use ddetr_trainer::inference;

use super::spec::resolve;
use super::SpecArgs;

pub(super) fn run(args: &SpecArgs) -> anyhow::Result<()> {
    let spec = resolve(args)?.spec;
    let out = inference::inference(&spec)?;
    eprintln!(
        "inference: {} images, {} detections at or above conf_threshold {}",
        out.images, out.detections, spec.inference.conf_threshold
    );
    eprintln!(
        "inference: annotated images in {}, KITTI labels in {}",
        out.images_dir.display(),
        out.labels_dir.display()
    );
    Ok(())
}
