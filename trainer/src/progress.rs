//! Training progress on rank 0: step/steps, images/s, loss and ETA, as a live indicatif bar when
//! stdout is a terminal, else one log line (tracing, INFO) at an epoch's first step, every
//! [`LOG_EVERY`] and at its last step. Every rank also keeps the wall time of each step (loader
//! wait + forward + backward + gradient sync + optimizer) for `ddetr bench train`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the log-line mode reports within an epoch.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// One step's figures (averaged over ranks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub loss_ce: f64,
    pub loss_bbox: f64,
    pub loss_giou: f64,
    pub lr: f64,
}

/// Where the progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// Not rank 0: only step times are kept.
    Off,
    /// Periodic log lines.
    Log,
    /// A live bar on stdout.
    Bar,
}

impl Display {
    /// `Bar` on rank 0 with a terminal on stdout, `Log` on rank 0 otherwise, else `Off`.
    pub fn auto(rank: usize) -> Self {
        match (rank, std::io::stdout().is_terminal()) {
            (0, true) => Self::Bar,
            (0, false) => Self::Log,
            _ => Self::Off,
        }
    }
}

pub struct Progress {
    display: Display,
    bar: Option<ProgressBar>,
    epochs: u32,
    steps: usize,
    global_batch: usize,
    /// Steps done in this run (a resumed run counts from its start).
    done: u64,
    /// Training time of this run, validation and checkpoints excluded.
    busy: Duration,
    /// When the current step started (the epoch start or the previous step's end).
    mark: Instant,
    last_log: Option<Instant>,
    step_s: Vec<f64>,
}

impl Progress {
    /// `start` is the (epoch, step) this run begins at.
    pub fn new(
        display: Display,
        epochs: u32,
        steps: usize,
        global_batch: usize,
        start: (u32, usize),
    ) -> Self {
        let total = u64::from(epochs) * steps as u64;
        let bar = (display == Display::Bar).then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:20}] {pos}/{len} {msg}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            b.set_position(u64::from(start.0) * steps as u64 + start.1 as u64);
            b
        });
        Self {
            display,
            bar,
            epochs,
            steps,
            global_batch,
            done: 0,
            busy: Duration::ZERO,
            mark: Instant::now(),
            last_log: None,
            step_s: Vec::new(),
        }
    }

    /// A new length of the run (`train.max_minutes` fitted the schedule).
    pub fn set_epochs(&mut self, epochs: u32) {
        self.epochs = epochs;
        if let Some(b) = &self.bar {
            b.set_length(u64::from(epochs) * self.steps as u64);
        }
    }

    /// Call as an epoch's steps begin: time spent since (validation, checkpoints) is not counted.
    pub fn start_epoch(&mut self, epoch: u32) {
        self.mark = Instant::now();
        self.last_log = None;
        if let Some(b) = &self.bar {
            b.set_prefix(format!("epoch {}/{}", epoch + 1, self.epochs));
        }
    }

    /// Call after each optimizer step; `step` is the last loader step it took and
    /// `loader_steps` how many it took (`train.grad_accum_steps` micro batches, fewer at an
    /// epoch's end), so images/s, the ETA and the step times count loader steps.
    pub fn step(&mut self, epoch: u32, step: usize, loader_steps: usize, s: StepStats) {
        let now = Instant::now();
        if let Some(line) = self.update(now, epoch, step, loader_steps, s) {
            match &self.bar {
                Some(b) => {
                    b.set_message(line);
                    b.set_position(u64::from(epoch) * self.steps as u64 + step as u64 + 1);
                }
                None => tracing::info!("{line}"),
            }
        }
    }

    /// Clears the bar.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }

    /// Seconds of each step of this run, in order (the first includes the loader's start).
    pub fn step_seconds(&self) -> &[f64] {
        &self.step_s
    }

    /// Images per second over this run's training time.
    pub fn images_per_s(&self) -> f64 {
        self.done as f64 * self.global_batch as f64 / self.busy.as_secs_f64().max(1e-9)
    }

    /// Records the step ending at `now`; returns the text to show, when it is time to show one.
    fn update(
        &mut self,
        now: Instant,
        epoch: u32,
        step: usize,
        loader_steps: usize,
        s: StepStats,
    ) -> Option<String> {
        let dt = now.saturating_duration_since(self.mark);
        self.mark = now;
        self.busy += dt;
        let n = loader_steps.max(1);
        self.done += n as u64;
        // One time per loader step: the budget multiplies them by the loader's steps.
        let each = dt.as_secs_f64() / n as f64;
        self.step_s.extend(std::iter::repeat_n(each, n));
        let due = match self.display {
            Display::Off => false,
            Display::Bar => true,
            Display::Log => {
                self.last_log
                    .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
                    || step + 1 == self.steps
            }
        };
        if !due {
            return None;
        }
        self.last_log = Some(now);
        let ips = self.images_per_s();
        let left = (self.epochs - epoch - 1) as usize * self.steps + (self.steps - step - 1);
        let eta = left as f64 * self.global_batch as f64 / ips.max(1e-9);
        Some(match self.display {
            // Short enough for an 80-column terminal; the lr is in the log lines.
            Display::Bar => format!("loss {:.4} | {ips:.1} img/s | ETA {}", s.loss, fmt_secs(eta)),
            _ => format!(
                "epoch {}/{} step {}/{} loss {:.4} (ce {:.4} bbox {:.4} giou {:.4}) lr {:.2e} {ips:.1} img/s ETA {}",
                epoch + 1,
                self.epochs,
                step + 1,
                self.steps,
                s.loss,
                s.loss_ce,
                s.loss_bbox,
                s.loss_giou,
                s.lr,
                fmt_secs(eta)
            ),
        })
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: StepStats = StepStats {
        loss: 2.5,
        loss_ce: 1.0,
        loss_bbox: 0.5,
        loss_giou: 1.0,
        lr: 2e-4,
    };

    #[test]
    fn log_mode_reports_the_first_step_then_every_period_and_the_epoch_end() {
        let mut p = Progress::new(Display::Log, 2, 10, 4, (0, 0));
        let t0 = Instant::now();
        p.mark = t0;
        p.start_epoch(0);
        p.mark = t0;
        let mut shown = Vec::new();
        for step in 0..10 {
            // 3 s per step: 4 images / 3 s.
            let now = t0 + Duration::from_secs(3 * (step as u64 + 1));
            if let Some(l) = p.update(now, 0, step, 1, S) {
                shown.push((step, l));
            }
        }
        let steps: Vec<usize> = shown.iter().map(|(s, _)| *s).collect();
        // Step 0 (first), step 4 (12 s after step 0 >= 10 s), step 8, and the last step 9.
        assert_eq!(steps, vec![0, 4, 8, 9]);
        assert_eq!(
            shown[0].1,
            "epoch 1/2 step 1/10 loss 2.5000 (ce 1.0000 bbox 0.5000 giou 1.0000) lr 2.00e-4 1.3 img/s ETA 0:00:57"
        );
        // After 10 steps of 3 s, 10 steps are left: 30 s.
        assert!(shown[3].1.ends_with("ETA 0:00:30"), "{}", shown[3].1);
        assert_eq!(p.step_seconds().len(), 10);
        assert!((p.images_per_s() - 4.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn other_ranks_show_nothing_but_keep_step_times() {
        let mut p = Progress::new(Display::Off, 1, 3, 2, (0, 0));
        let t0 = p.mark;
        for step in 0..3 {
            let now = t0 + Duration::from_millis(500 * (step as u64 + 1));
            assert_eq!(p.update(now, 0, step, 1, S), None);
        }
        assert_eq!(p.step_seconds(), &[0.5, 0.5, 0.5]);
    }

    #[test]
    fn time_between_epochs_is_not_a_step() {
        let mut p = Progress::new(Display::Off, 2, 1, 2, (0, 0));
        p.start_epoch(0);
        let t0 = p.mark;
        p.update(t0 + Duration::from_secs(1), 0, 0, 1, S);
        std::thread::sleep(Duration::from_millis(30));
        p.start_epoch(1);
        let t1 = p.mark;
        p.update(t1 + Duration::from_secs(1), 1, 0, 1, S);
        assert_eq!(p.step_seconds(), &[1.0, 1.0]);
    }

    #[test]
    fn an_accumulated_step_counts_its_loader_steps() {
        let mut p = Progress::new(Display::Off, 1, 4, 2, (0, 0));
        let t0 = p.mark;
        // Two optimizer steps of 2 micro batches, 1 s each: 4 loader steps of 0.5 s.
        p.update(t0 + Duration::from_secs(1), 0, 1, 2, S);
        p.update(t0 + Duration::from_secs(2), 0, 3, 2, S);
        assert_eq!(p.step_seconds(), &[0.5, 0.5, 0.5, 0.5]);
        assert!((p.images_per_s() - 4.0).abs() < 1e-9);
    }
}

/// `H:MM:SS`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}
