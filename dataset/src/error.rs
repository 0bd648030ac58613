//! The dataset crate's errors. Each message is one line: what is wrong (with counts and the first
//! few offenders) and what to do about it.

use std::path::PathBuf;

/// How many offenders a message lists before "… and N more".
pub const FIRST_FEW: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{}: {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{}: malformed JSON at line {line} column {column}: {message}", .path.display())]
    MalformedJson {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    #[error("{}: {count} image file(s) listed in the annotations are missing from {}: {}; fix file_name or image_dir", .json.display(), .image_dir.display(), .first)]
    MissingImages {
        json: PathBuf,
        image_dir: PathBuf,
        count: usize,
        first: String,
    },

    #[error("{}: {count} annotation(s) use category_id 0, which is reserved for background ({}); category ids start at 1", .json.display(), .first)]
    CategoryZero {
        json: PathBuf,
        count: usize,
        first: String,
    },

    #[error("{}: {count} annotation(s) use a category_id not listed in `categories` ({}); add the category or fix the annotation", .json.display(), .first)]
    UnknownCategory {
        json: PathBuf,
        count: usize,
        first: String,
    },

    #[error("dataset.num_classes is {num_classes} but annotations use category_id {max_category_id}: set dataset.num_classes to at least {}", .max_category_id + 1)]
    NumClassesTooSmall {
        num_classes: u32,
        max_category_id: u32,
    },

    #[error("{}: {count} duplicate image id(s) ({}); image ids must be unique within a file", .json.display(), .first)]
    DuplicateImageIds {
        json: PathBuf,
        count: usize,
        first: String,
    },

    #[error("{}: {count} duplicate annotation id(s) ({}); annotation ids must be unique within a file", .json.display(), .first)]
    DuplicateAnnotationIds {
        json: PathBuf,
        count: usize,
        first: String,
    },

    #[error("{}: {count} annotation(s) refer to image ids that are not in `images` ({}); remove them or add the images", .json.display(), .first)]
    OrphanAnnotations {
        json: PathBuf,
        count: usize,
        first: String,
    },

    #[error("{}: {message}", .json.display())]
    BadAnnotationFile { json: PathBuf, message: String },

    #[error("{}: {message}", .path.display())]
    BadSource { path: PathBuf, message: String },

    #[error("no data sources given for {split}: set dataset.{split}_data_sources in the spec")]
    NoSources { split: String },

    #[error("{}: not a ddetr dataset cache (bad magic); delete it or point elsewhere", .path.display())]
    NotACache { path: PathBuf },

    #[error("{}: cache format version {found}, this ddetr reads version {expected}; it will be rebuilt", .path.display())]
    CacheVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },

    #[error("{}: cache is corrupt ({what}); it will be rebuilt", .path.display())]
    CacheCorrupt { path: PathBuf, what: String },

    #[error("{}: waited {waited_s} s for local rank 0 to build the dataset cache; check that rank's log", .path.display())]
    CacheWaitTimeout { path: PathBuf, waited_s: u64 },

    #[error("cannot write the dataset cache in {}: {source}; set DDETR_CACHE_DIR to a writable folder", .dir.display())]
    CacheDirNotWritable {
        dir: PathBuf,
        source: std::io::Error,
    },

    #[error("image {name}: {reason}")]
    CorruptImage { name: String, reason: String },

    #[error("{0}")]
    InvalidArgument(String),
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }

    /// Whether the invocation is at fault (a bad argument) rather than the data or the machine:
    /// the binaries exit 2 for these. (The data contradicting the spec, such as
    /// [`DatasetError::NumClassesTooSmall`], is the data's here; the trainer, whose model the
    /// spec's class count sizes, counts it as the spec's.)
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::InvalidArgument(_))
    }
}

/// "a, b, c, d, e and 12 more" from an iterator of displayable offenders and their total count.
pub(crate) fn first_few<T: std::fmt::Display>(
    items: impl IntoIterator<Item = T>,
    total: usize,
) -> String {
    let shown: Vec<String> = items
        .into_iter()
        .take(FIRST_FEW)
        .map(|x| x.to_string())
        .collect();
    let mut s = shown.join(", ");
    if total > shown.len() {
        s.push_str(&format!(" and {} more", total - shown.len()));
    }
    s
}

pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_few_lists_five_then_counts_the_rest() {
        assert_eq!(first_few(1..=3, 3), "1, 2, 3");
        assert_eq!(first_few(1..=20, 20), "1, 2, 3, 4, 5 and 15 more");
    }

    #[test]
    fn num_classes_message_says_what_to_set() {
        let e = DatasetError::NumClassesTooSmall {
            num_classes: 4,
            max_category_id: 7,
        };
        assert_eq!(
            e.to_string(),
            "dataset.num_classes is 4 but annotations use category_id 7: set dataset.num_classes to at least 8"
        );
    }
}
