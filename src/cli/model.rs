//! `ddetr model info -e spec.yaml`: the spec's network built (no checkpoint needed), its
//! parameters counted per module — trainable (in an optimizer group) and frozen (FrozenBatchNorm
//! statistics and affine terms, the backbone stages TAO keeps frozen, `train.freeze`) — so a
//! user can size a run before starting it. The last line is `key=value`.

use std::collections::BTreeMap;

use ddetr_trainer::detector::{build_model, Built, DeformableDetrDetector, Detector, DinoDetector};
use ddetr_trainer::spec::{Architecture, Backbone, ExperimentSpec};
use tch::Device;

use super::SpecArgs;

pub(super) fn info(args: &SpecArgs) -> anyhow::Result<()> {
    let spec = super::spec::resolve(args)?.spec;
    let rows = match spec.architecture() {
        Architecture::DeformableDetr => count(&build_model::<DeformableDetrDetector>(
            &spec,
            Device::Cpu,
            0,
        )?),
        Architecture::Dino => count(&build_model::<DinoDetector>(&spec, Device::Cpu, 0)?),
    };
    print!("{}", render(&spec, &rows));
    Ok(())
}

/// The module a variable belongs to: `transformer.<part>`, `backbone.0.body.<stage>`, or its
/// first name component.
fn module_of(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let depth = match parts[0] {
        "transformer" => 2,
        "backbone" => 4,
        _ => 1,
    };
    // The module: `depth` components, but never the variable's own last name; a variable
    // directly under a grouped part (`transformer.level_embed`) is its own row.
    let d = depth.min(parts.len() - 1);
    if d < depth && d <= 1 && parts.len() > 1 && depth > 1 {
        return name.to_string();
    }
    parts[..d.max(1)].join(".")
}

/// (trainable, frozen) element counts per module.
fn count<D: Detector>(built: &Built<D>) -> BTreeMap<String, (i64, i64)> {
    let mut rows: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for p in &built.params {
        rows.entry(module_of(&p.name)).or_default().0 += p.tensor.numel() as i64;
    }
    for (name, t) in &built.buffers {
        rows.entry(module_of(name)).or_default().1 += t.numel() as i64;
    }
    rows
}

fn render(spec: &ExperimentSpec, rows: &BTreeMap<String, (i64, i64)>) -> String {
    let m = &spec.model;
    let mut out = format!(
        "model: {} ({}, {} levels, d {}, {}+{} layers, {} queries, {} classes)\n",
        spec.architecture().name(),
        match m.backbone {
            Backbone::Resnet18 => "resnet_18",
            Backbone::Resnet34 => "resnet_34",
            Backbone::Resnet50 => "resnet_50",
        },
        m.num_feature_levels,
        m.hidden_dim,
        m.enc_layers,
        m.dec_layers,
        m.num_queries,
        spec.dataset.num_classes
    );
    out += &format!("{:<36} {:>12} {:>12}\n", "module", "trainable", "frozen");
    let (mut trainable, mut frozen) = (0i64, 0i64);
    for (module, (t, f)) in rows {
        out += &format!("{module:<36} {:>12} {:>12}\n", group(*t), group(*f));
        trainable += t;
        frozen += f;
    }
    out += &format!(
        "{:<36} {:>12} {:>12}\n",
        "total",
        group(trainable),
        group(frozen)
    );
    out += &format!(
        "params={} trainable={trainable} frozen={frozen}\n",
        trainable + frozen
    );
    out
}

/// `1234567` → `1,234,567`.
fn group(n: i64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_and_digit_groups() {
        assert_eq!(
            module_of("transformer.encoder.layers.0.linear1.weight"),
            "transformer.encoder"
        );
        assert_eq!(
            module_of("backbone.0.body.layer2.0.conv1.weight"),
            "backbone.0.body.layer2"
        );
        assert_eq!(module_of("class_embed.0.weight"), "class_embed");
        assert_eq!(
            module_of("transformer.level_embed"),
            "transformer.level_embed"
        );
        assert_eq!(
            module_of("transformer.tgt_embed.weight"),
            "transformer.tgt_embed"
        );
        assert_eq!(group(46_792_702), "46,792,702");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
    }
}
