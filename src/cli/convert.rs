//! `ddetr convert -e spec.yaml`: TAO's KITTI → sharded COCO JSON (the spec's `convert` section).

use anyhow::Context as _;

use super::SpecArgs;

pub(super) fn run(args: &SpecArgs) -> anyhow::Result<()> {
    let resolved = super::spec::resolve(args)?;
    let s = ddetr_dataset::convert::convert(&resolved.spec.convert).context("convert")?;
    for f in &s.files {
        println!("{}", f.display());
    }
    let classes: Vec<String> = s
        .categories
        .iter()
        .map(|(name, id)| format!("{id}={name}"))
        .collect();
    println!(
        "converted {} images, {} annotations into {} file(s); categories {}; skipped {} unmapped and {} empty boxes",
        s.images,
        s.annotations,
        s.files.len(),
        classes.join(" "),
        s.unmapped,
        s.invalid
    );
    Ok(())
}
