//! The `dataset` crate owns everything between a user's annotation files and a batch of tensors:
//! the `dataset`/`convert` sections of the experiment spec, COCO and KITTI readers, the
//! memory-mapped dataset cache that every rank of a node maps read-only, the synthetic shapes
//! dataset the demo and tests train on, the TAO/official augmentation, the distributed sampler, and
//! collation into padded tch tensors with masks.

pub mod cache;
pub mod coco;
pub mod config;
pub mod convert;
pub mod error;
pub mod eval_batches;
pub mod image;
pub mod inspect;
pub mod layout;
pub mod loader;
pub mod rng;
pub mod sampler;
pub mod synth;
pub mod transforms;
mod upsample;

pub use cache::{Cache, CacheOptions};
pub use config::{AugmentationConfig, ConvertConfig, DataSource, DatasetConfig, EvalPadding};
pub use error::DatasetError;
