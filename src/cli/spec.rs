//! `ddetr spec show|validate`.

use anyhow::Context as _;
use ddetr_trainer::spec::{self, Resolved};

use super::SpecArgs;

/// Loads the spec named by the task arguments and prints its notices to stderr.
pub(crate) fn resolve(args: &SpecArgs) -> anyhow::Result<Resolved> {
    let resolved = spec::load(&args.spec, &args.overrides, args.results_dir.as_deref())
        .with_context(|| format!("spec {}", args.spec.display()))?;
    for notice in &resolved.notices {
        eprintln!("notice: {notice}");
    }
    Ok(resolved)
}

pub(super) fn show(args: &SpecArgs) -> anyhow::Result<()> {
    print!("{}", resolve(args)?.spec.to_yaml());
    Ok(())
}

pub(super) fn validate(args: &SpecArgs) -> anyhow::Result<()> {
    let resolved = resolve(args)?;
    eprintln!(
        "{}: valid (spec hash {})",
        args.spec.display(),
        &resolved.spec.hash()[..12]
    );
    Ok(())
}
