//! A task's results folder: the writability check before any work, `status.json` (JSON lines in
//! the shape TAO's status logger writes: date, time, status, verbosity, message, kpi) and the
//! resolved spec `experiment.yaml`.

use std::io::Write;
use std::path::PathBuf;

use crate::spec::ExperimentSpec;
use crate::TrainerError;

/// A task's results folder.
#[derive(Debug, Clone)]
pub struct ResultsDir {
    pub path: PathBuf,
}

impl ResultsDir {
    /// Creates `path` and checks that it can be written, before the task spends time.
    pub fn create(path: PathBuf) -> Result<Self, TrainerError> {
        let bad = |e: std::io::Error| {
            TrainerError::Config(format!(
                "results_dir {} is not writable ({e}): give a writable folder with -r",
                path.display()
            ))
        };
        std::fs::create_dir_all(&path).map_err(bad)?;
        let probe = path.join(format!(".write-probe-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(bad)?;
        let _ = std::fs::remove_file(probe);
        Ok(Self { path })
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `name` in the folder.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), TrainerError> {
        let path = self.join(name);
        std::fs::write(&path, bytes).map_err(|e| TrainerError::io("write", &path, e))
    }

    /// `experiment.yaml`: the spec the task ran with, every default filled in.
    pub fn write_experiment(&self, spec: &ExperimentSpec) -> Result<(), TrainerError> {
        self.write("experiment.yaml", spec.to_yaml().as_bytes())
    }

    /// Appends one status record to `status.json`.
    pub fn status(
        &self,
        status: &str,
        message: &str,
        kpi: Option<serde_json::Value>,
    ) -> Result<(), TrainerError> {
        let (date, time) = now_date_time();
        let mut rec = serde_json::json!({
            "date": date, "time": time, "status": status, "verbosity": "INFO", "message": message,
        });
        if let Some(k) = kpi {
            rec["kpi"] = k;
        }
        let path = self.join("status.json");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{rec}"))
            .map_err(|e| TrainerError::io("write", &path, e))
    }
}

/// The UTC date and time as TAO's status logger writes them (`12/3/2026`, `9:5:7`: no padding).
fn now_date_time() -> (String, String) {
    let t = time::OffsetDateTime::now_utc();
    (
        format!("{}/{}/{}", u8::from(t.month()), t.day(), t.year()),
        format!("{}:{}:{}", t.hour(), t.minute(), t.second()),
    )
}
