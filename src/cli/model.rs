//! `ddetr model info -e spec.yaml`: the spec's network built (no checkpoint needed), its
//! parameters counted per module — trainable (in an optimizer group) and frozen (FrozenBatchNorm
//! statistics and affine terms, the backbone stages TAO keeps frozen, `train.freeze`) — so a
//! user can size a run before starting it — and the FLOPs of one forward at the export size
//! (`ddetr_trainer::flops`, counted on the exported graph). The last line is `key=value`.

use std::collections::BTreeMap;

use ddetr_trainer::detector::{build_model, Built, DeformableDetrDetector, Detector, DinoDetector};
use ddetr_trainer::export::{self, ExportOptions};
use ddetr_trainer::flops::{self, FlopCount};
use ddetr_trainer::spec::{Architecture, ExperimentSpec};
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
    let flops = flops(&spec);
    print!("{}", render(&spec, &rows, flops.as_ref()));
    Ok(())
}

/// FLOPs at the export size, or `None` with one line saying why (a model the exporter does not
/// write, no onnxruntime).
fn flops(spec: &ExperimentSpec) -> Option<(u32, u32, BTreeMap<String, FlopCount>)> {
    let opts = ExportOptions::from_spec(&spec.export);
    let hw = (opts.input_height, opts.input_width);
    let counted =
        export::spec_graph(spec, None, &opts).and_then(|g| flops::count_by_module(&g, hw));
    match counted {
        Ok(c) => Some((hw.0, hw.1, c)),
        Err(e) => {
            eprintln!("FLOPs not counted: {e}");
            None
        }
    }
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

fn render(
    spec: &ExperimentSpec,
    rows: &BTreeMap<String, (i64, i64)>,
    flops: Option<&(u32, u32, BTreeMap<String, FlopCount>)>,
) -> String {
    let m = &spec.model;
    let mut out = format!(
        "model: {} ({}, {} levels, d {}, {}+{} layers, {} queries, {} classes)\n",
        spec.architecture().name(),
        m.backbone.name(),
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
    let mut kv = format!(
        "params={} trainable={trainable} frozen={frozen}",
        trainable + frozen
    );
    if let Some((h, w, modules)) = flops {
        let c = &FlopCount::sum(modules.values());
        let g = |x: f64| x / 1e9;
        out += &format!(
            "FLOPs of one {h}x{w} image (export.input_height x input_width; fvcore's rules, a multiply-add = 1): {:.2} G = conv {:.2} + linear {:.2} + attention {:.2} + norms {:.2} + deformable sampling {:.2}{}\n",
            g(c.total()),
            g(c.conv),
            g(c.linear),
            g(c.attention),
            g(c.norm),
            g(c.sampling),
            if c.pool > 0.0 { format!(" + pooling {:.3}", g(c.pool)) } else { String::new() }
        );
        let per_module: Vec<String> = modules
            .iter()
            .map(|(m, c)| format!("{m} {:.2}", g(c.total())))
            .collect();
        out += &format!("FLOPs by module (G): {}\n", per_module.join(", "));
        kv += &format!(" input={h}x{w} gflops={:.3}", g(c.total()));
    }
    out + &kv + "\n"
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
