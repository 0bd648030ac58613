//! The `dataset` crate owns everything between a user's annotation files and a batch of tensors:
//! the `dataset`/`convert` sections of the experiment spec, COCO and KITTI readers, the
//! memory-mapped dataset cache that every rank of a node maps read-only, the synthetic shapes
//! dataset the demo and tests train on, the TAO/official augmentation, the distributed sampler, and
//! collation into padded tch tensors with masks.
//!
//! The cache is a folder of one file per part, all re-exported by [`cache`]: `format` (the
//! on-disk layout), `open` ([`Cache`]: mapping, checking and reading a file), `ensure` (where the
//! file lives and the lock by which local rank 0 builds it while the others wait), `build`
//! (checking the sources and writing the file) and `pack` (copying image bytes into its heap).

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
