//! The optimizer's parameter groups, shared by every detector (TAO's `deformable_detr` and `dino`
//! use the same three): a detector puts a variable in a group by building it under a path with
//! `nn::Path::set_group`, and [`crate::optim::Optim`] gives each group its learning rate.

/// Every parameter not in another group: `train.optim.lr`.
pub const GROUP_DEFAULT: usize = 0;
/// `backbone.0.*` (upstream's `lr_backbone_names`): `train.optim.lr_backbone`.
pub const GROUP_BACKBONE: usize = 1;
/// `*sampling_offsets*` and `*reference_points*` (upstream's `lr_linear_proj_names`):
/// `lr · lr_linear_proj_mult`.
pub const GROUP_LINEAR_PROJ: usize = 2;

/// The group's name, as upstream calls it.
pub fn group_name(group: usize) -> &'static str {
    match group {
        GROUP_BACKBONE => "backbone",
        GROUP_LINEAR_PROJ => "linear_proj",
        _ => "default",
    }
}
