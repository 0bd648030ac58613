//! Ensuring a split's cache exists and is fresh before training or evaluation reads it: where the
//! file lives, and the lock by which local rank 0 builds (or reuses) it while the other local
//! ranks wait, then everyone maps the same file.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::build::build;
use super::format::absolute;
use super::open::{Cache, Staleness};
use crate::config::DataSource;
use crate::error::{DatasetError, Result};

/// Extension of cache files.
pub const EXTENSION: &str = "ddetr-cache";
/// Environment variable naming a folder for cache files (default: next to the first json_file).
pub const CACHE_DIR_ENV: &str = "DDETR_CACHE_DIR";

/// The default cache file for a list of sources: `<folder of the first json_file>/<its stem>.<hash>.ddetr-cache`,
/// or in `$DDETR_CACHE_DIR` when set (for read-only dataset folders). The hash covers every source's
/// absolute paths, so two splits or two source lists never share a file.
pub fn default_path(sources: &[DataSource]) -> Result<PathBuf> {
    let first = sources.first().ok_or_else(|| DatasetError::NoSources {
        split: "this".into(),
    })?;
    let json = absolute(Path::new(&first.json_file))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for s in sources {
        hasher.update(
            absolute(Path::new(&s.image_dir))?
                .as_os_str()
                .as_encoded_bytes(),
        );
        hasher.update(b"\0");
        hasher.update(
            absolute(Path::new(&s.json_file))?
                .as_os_str()
                .as_encoded_bytes(),
        );
        hasher.update(b"\0");
    }
    let stem = json
        .file_stem()
        .map_or("dataset".into(), |s| s.to_string_lossy().into_owned());
    let name = format!("{stem}.{:08x}.{EXTENSION}", hasher.digest() as u32);
    let dir = match std::env::var_os(CACHE_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => json.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    Ok(dir.join(name))
}

/// How to build or reuse a cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Cache file; `None` → [`default_path`].
    pub path: Option<PathBuf>,
    /// Pack every image's bytes into the cache (always done for tar.gz sources).
    pub pack_images: bool,
    /// `dataset.num_classes`, checked against the largest category id.
    pub num_classes: Option<u32>,
    /// Rank within the node: 0 builds, the others wait.
    pub local_rank: u32,
    /// How long a non-zero local rank waits for rank 0's build.
    pub wait_timeout: Duration,
    /// Which split, for messages ("train", "val", "test").
    pub split: String,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            path: None,
            pack_images: false,
            num_classes: None,
            local_rank: 0,
            wait_timeout: Duration::from_secs(3600),
            split: "train".into(),
        }
    }
}

/// Opens the cache for `sources`, building it first if it is missing, stale, from another format
/// version or corrupt. Local rank 0 builds under an exclusive lock on `<cache>.lock`; other local
/// ranks take a shared lock (so they block while it builds) and poll until the cache is fresh.
pub fn ensure(sources: &[DataSource], opts: &CacheOptions) -> Result<Cache> {
    if sources.is_empty() {
        return Err(DatasetError::NoSources {
            split: opts.split.clone(),
        });
    }
    let path = match &opts.path {
        Some(p) => p.clone(),
        None => default_path(sources)?,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let unwritable = |source| DatasetError::CacheDirNotWritable {
        dir: dir.clone(),
        source,
    };
    fs::create_dir_all(&dir).map_err(unwritable)?;
    let cache = if opts.local_rank == 0 {
        let lock = File::create(lock_path(&path)).map_err(unwritable)?;
        build_or_reuse(sources, &path, opts, lock)?
    } else {
        wait_for_fresh(sources, path, opts)?
    };
    if let Some(n) = opts.num_classes {
        cache.check_num_classes(n)?;
    }
    Ok(cache)
}

/// Local rank 0: under an exclusive lock on `lock`, reuses the cache at `path` if it is fresh,
/// else builds it.
fn build_or_reuse(
    sources: &[DataSource],
    path: &Path,
    opts: &CacheOptions,
    lock: File,
) -> Result<Cache> {
    lock.lock()
        .map_err(|e| DatasetError::io(lock_path(path), e))?;
    let cache = match reusable(sources, path, opts)? {
        Some(c) => c,
        None => build(sources, path, opts)?,
    };
    drop(lock);
    Ok(cache)
}

/// The cache at `path` if it opens and is fresh; `None` (logged) when it is missing, stale, from
/// another format version or corrupt.
fn reusable(sources: &[DataSource], path: &Path, opts: &CacheOptions) -> Result<Option<Cache>> {
    match Cache::open(path) {
        Ok(c) => match c.staleness(sources, opts.pack_images)? {
            Staleness::Fresh => Ok(Some(c)),
            Staleness::Stale(why) => {
                tracing::info!("rebuilding dataset cache {}: {why}", path.display());
                Ok(None)
            }
        },
        Err(DatasetError::Io { error: source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e @ (DatasetError::CacheVersion { .. } | DatasetError::CacheCorrupt { .. })) => {
            tracing::warn!("{e}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Other local ranks: under a shared lock (which blocks while rank 0 builds), polls until the
/// cache at `path` is fresh or `opts.wait_timeout` passes.
fn wait_for_fresh(sources: &[DataSource], path: PathBuf, opts: &CacheOptions) -> Result<Cache> {
    let lock_path = lock_path(&path);
    let started = Instant::now();
    loop {
        let lock = File::options()
            .create(true)
            .append(true)
            .open(&lock_path)
            .map_err(|e| DatasetError::io(&lock_path, e))?;
        lock.lock_shared()
            .map_err(|e| DatasetError::io(&lock_path, e))?;
        if let Ok(c) = Cache::open(&path) {
            if c.staleness(sources, opts.pack_images)? == Staleness::Fresh {
                return Ok(c);
            }
        }
        drop(lock);
        if started.elapsed() > opts.wait_timeout {
            return Err(DatasetError::CacheWaitTimeout {
                path,
                waited_s: started.elapsed().as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn lock_path(cache: &Path) -> PathBuf {
    let mut s = cache.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// The dataset splits that have their own sources in the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    /// `dataset.<split>_data_sources`.
    pub fn sources(self, config: &crate::config::DatasetConfig) -> &[DataSource] {
        match self {
            Split::Train => &config.train_data_sources,
            Split::Val => &config.val_data_sources,
            Split::Test => &config.test_data_sources,
        }
    }
}

impl std::str::FromStr for Split {
    type Err = DatasetError;
    fn from_str(s: &str) -> Result<Self> {
        Split::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                DatasetError::InvalidArgument(format!(
                    "unknown split '{s}': use train, val or test"
                ))
            })
    }
}

/// The cache of one split of a spec's dataset section, with `dataset.num_classes` checked: what
/// train/evaluate call at start (every local rank; `local_rank` 0 builds).
pub fn ensure_split(
    config: &crate::config::DatasetConfig,
    split: Split,
    local_rank: u32,
    pack_images: bool,
) -> Result<Cache> {
    let opts = CacheOptions {
        num_classes: Some(config.num_classes),
        local_rank,
        pack_images,
        split: split.name().to_string(),
        ..CacheOptions::default()
    };
    ensure(split.sources(config), &opts)
}
