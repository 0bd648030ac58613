//! The `trainer` crate owns the model half and the tasks: the experiment spec ([`spec`]), and (as
//! they land) the Deformable DETR model in tch with upstream parameter names, the Hungarian
//! matcher, the criterion, post-processing, optimizer groups and schedules, checkpoints, and the
//! train/evaluate/inference/export tasks that tie dataset, model and collective layer together.

pub mod spec;
