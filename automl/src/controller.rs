//! The search as a state machine: it is told what happened ([`Event`]: a trial reported its
//! metric, a trial's process ended) and answers what to do ([`Action`]: start or resume a trial
//! for so many epochs, stop one). It owns no process and reads no clock, so the driver can save
//! it after every event ([`Controller`] is serde) and a killed search continues from the file.
//!
//! - `random` and `bayesian` run every trial for the full epochs; `bayesian` proposes each new
//!   trial by expected improvement ([`crate::bayes`]) once `max(3, max_concurrent)` trials
//!   have a metric.
//! - `hyperband` is asynchronous successive halving (ASHA, Li et al. 2020) over Hyperband's
//!   rungs: a trial first runs `R / ν^K` epochs (`K = ⌊log_ν R⌋`), exits at the rung (its
//!   checkpoint written), and is resumed for `ν` times more epochs when its metric is in the top
//!   `1/ν` of the trials that reached that rung; otherwise it stays paused there.

use serde::{Deserialize, Serialize};

use crate::bayes;
use crate::rng::Rng;
use crate::space::{Point, Space};

/// `automl.automl_algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    Random,
    Bayesian,
    Hyperband,
}

/// Whether a larger metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Maximize,
    Minimize,
}

/// The search's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub algorithm: Algorithm,
    /// Trials to start in all.
    pub max_trials: usize,
    pub max_concurrent: usize,
    /// Epochs of a full trial (Hyperband's `R`).
    pub epochs: u32,
    /// Hyperband's reduction factor `ν` (≥ 2).
    pub nu: u32,
    pub direction: Direction,
    pub seed: u64,
}

/// Where a trial is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TrialState {
    /// Its process runs until `epochs`.
    Running {
        epochs: u32,
    },
    /// Exited at a Hyperband rung, waiting for a promotion.
    Paused,
    /// Ran its full epochs.
    Done,
    /// Stopped before its end (the search's budget ran out); its checkpoint is kept.
    Stopped,
    Failed {
        error: String,
    },
}

/// One trial: its parameters, where it is, the metric after each validated epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub id: usize,
    pub unit: Vec<f64>,
    pub params: Point,
    pub state: TrialState,
    /// (epoch, metric) in the order reported.
    pub history: Vec<(u32, f64)>,
    /// Epochs finished (the last exit's target).
    pub epochs_done: u32,
    /// Minutes its processes ran, summed.
    pub minutes: f64,
}

impl Trial {
    /// The last reported metric.
    pub fn metric(&self) -> Option<f64> {
        self.history.last().map(|h| h.1)
    }

    /// The metric reported at or before `epoch`, latest first.
    fn metric_at(&self, epoch: u32) -> Option<f64> {
        self.history
            .iter()
            .rev()
            .find(|h| h.0 <= epoch)
            .map(|h| h.1)
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A validation of `trial` after `epoch` epochs gave `value`.
    Metric {
        trial: usize,
        epoch: u32,
        value: f64,
    },
    /// The trial's process ended: cleanly (`error: None`) or not; `minutes` it ran.
    Exited {
        trial: usize,
        error: Option<String>,
        minutes: f64,
    },
    /// The trial was stopped by the driver (budget), its checkpoint written.
    Stopped { trial: usize, minutes: f64 },
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start (or resume from its checkpoint) `trial` to run until `epochs` epochs.
    Run { trial: usize, epochs: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Controller {
    pub settings: Settings,
    pub space: Space,
    pub trials: Vec<Trial>,
    rng: Rng,
    /// Hyperband promotions already made: (trial, rung).
    promoted: Vec<(usize, usize)>,
}

impl Controller {
    pub fn new(settings: Settings, space: Space) -> Self {
        let rng = Rng(settings.seed);
        Self {
            settings,
            space,
            trials: Vec::new(),
            rng,
            promoted: Vec::new(),
        }
    }

    /// Hyperband's rung epochs, smallest first, the last `R`.
    pub fn rungs(&self) -> Vec<u32> {
        let (r, nu) = (self.settings.epochs.max(1), self.settings.nu.max(2));
        if self.settings.algorithm != Algorithm::Hyperband {
            return vec![r];
        }
        let mut k = 0u32;
        while nu.pow(k + 1) <= r {
            k += 1;
        }
        let mut rungs: Vec<u32> = (0..=k).map(|i| (r / nu.pow(k - i)).max(1)).collect();
        rungs.dedup();
        *rungs.last_mut().expect("one rung") = r;
        rungs
    }

    /// Larger is better after this.
    fn score(&self, v: f64) -> f64 {
        match self.settings.direction {
            Direction::Maximize => v,
            Direction::Minimize => -v,
        }
    }

    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Metric {
                trial,
                epoch,
                value,
            } => {
                if let Some(t) = self.trials.get_mut(trial) {
                    if value.is_finite() {
                        t.history.push((epoch, value));
                    }
                }
            }
            Event::Exited {
                trial,
                error,
                minutes,
            } => {
                let last = self.rungs().last().copied().unwrap_or(1);
                if let Some(t) = self.trials.get_mut(trial) {
                    t.minutes += minutes;
                    let target = match t.state {
                        TrialState::Running { epochs } => epochs,
                        _ => t.epochs_done,
                    };
                    t.state = match error {
                        Some(error) => TrialState::Failed { error },
                        None => {
                            t.epochs_done = target;
                            if target >= last {
                                TrialState::Done
                            } else {
                                TrialState::Paused
                            }
                        }
                    };
                }
            }
            Event::Stopped { trial, minutes } => {
                if let Some(t) = self.trials.get_mut(trial) {
                    t.minutes += minutes;
                    t.state = TrialState::Stopped;
                }
            }
        }
    }

    fn running(&self) -> usize {
        self.trials
            .iter()
            .filter(|t| matches!(t.state, TrialState::Running { .. }))
            .count()
    }

    /// The actions that fill the free slots (`max_concurrent` minus what runs). Each is
    /// recorded as running at once.
    pub fn schedule(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        while self.running() < self.settings.max_concurrent.max(1) {
            let Some(a) = self.one() else { break };
            let Action::Run { trial, epochs } = a;
            self.trials[trial].state = TrialState::Running { epochs };
            actions.push(a);
        }
        actions
    }

    /// Trials that were running when the search was interrupted: run again until the same
    /// epochs (they resume from their checkpoints).
    pub fn interrupted(&self) -> Vec<Action> {
        self.trials
            .iter()
            .filter_map(|t| match t.state {
                TrialState::Running { epochs } => Some(Action::Run {
                    trial: t.id,
                    epochs,
                }),
                _ => None,
            })
            .collect()
    }

    fn one(&mut self) -> Option<Action> {
        if self.settings.algorithm == Algorithm::Hyperband {
            if let Some(a) = self.promotion() {
                return Some(a);
            }
        }
        if self.trials.len() >= self.settings.max_trials {
            return None;
        }
        let unit = self.propose();
        let id = self.trials.len();
        self.trials.push(Trial {
            id,
            params: self.space.decode(&unit),
            unit,
            state: TrialState::Paused,
            history: Vec::new(),
            epochs_done: 0,
            minutes: 0.0,
        });
        Some(Action::Run {
            trial: id,
            epochs: self.rungs()[0],
        })
    }

    /// ASHA: the highest rung with a paused trial in the top 1/ν of the trials that reached it.
    fn promotion(&mut self) -> Option<Action> {
        let rungs = self.rungs();
        let nu = self.settings.nu.max(2) as usize;
        for k in (0..rungs.len().saturating_sub(1)).rev() {
            let reached: Vec<&Trial> = self
                .trials
                .iter()
                .filter(|t| {
                    t.epochs_done >= rungs[k] && !matches!(t.state, TrialState::Failed { .. })
                })
                .collect();
            let mut scored: Vec<(f64, usize)> = reached
                .iter()
                .filter_map(|t| t.metric_at(rungs[k]).map(|m| (self.score(m), t.id)))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            let top = scored.len() / nu;
            for &(_, id) in scored.iter().take(top) {
                let t = &self.trials[id];
                if t.state == TrialState::Paused
                    && t.epochs_done == rungs[k]
                    && !self.promoted.contains(&(id, k))
                {
                    self.promoted.push((id, k));
                    return Some(Action::Run {
                        trial: id,
                        epochs: rungs[k + 1],
                    });
                }
            }
        }
        None
    }

    fn propose(&mut self) -> Vec<f64> {
        let dims = self.space.dims();
        let observed: Vec<(&Trial, f64)> = self
            .trials
            .iter()
            .filter_map(|t| t.metric().map(|m| (t, m)))
            .collect();
        let warm_up = 3.max(self.settings.max_concurrent);
        if self.settings.algorithm != Algorithm::Bayesian || observed.len() < warm_up {
            return self.space.sample_unit(&mut self.rng);
        }
        let xs: Vec<Vec<f64>> = observed.iter().map(|(t, _)| t.unit.clone()).collect();
        let ys: Vec<f64> = observed.iter().map(|(_, m)| self.score(*m)).collect();
        let pending: Vec<Vec<f64>> = self
            .trials
            .iter()
            .filter(|t| t.metric().is_none() && matches!(t.state, TrialState::Running { .. }))
            .map(|t| t.unit.clone())
            .collect();
        bayes::propose(&xs, &ys, &pending, dims, &mut self.rng)
    }

    /// Nothing runs and nothing more will start.
    pub fn finished(&mut self) -> bool {
        if self.running() > 0 {
            return false;
        }
        // Ask a copy, so the answer changes nothing.
        self.clone().one().is_none()
    }

    /// The best trial by its last metric (the earliest of equals).
    pub fn best(&self) -> Option<&Trial> {
        let mut best: Option<(f64, &Trial)> = None;
        for t in &self.trials {
            if matches!(t.state, TrialState::Failed { .. }) {
                continue;
            }
            if let Some(m) = t.metric() {
                let s = self.score(m);
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, t));
                }
            }
        }
        best.map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{Domain, Param};

    fn controller(
        algorithm: Algorithm,
        trials: usize,
        concurrent: usize,
        epochs: u32,
    ) -> Controller {
        let space = Space::new(vec![Param {
            name: "train.optim.lr".into(),
            domain: Domain::Float {
                min: 1e-5,
                max: 1e-3,
                log: true,
            },
        }])
        .unwrap();
        Controller::new(
            Settings {
                algorithm,
                max_trials: trials,
                max_concurrent: concurrent,
                epochs,
                nu: 3,
                direction: Direction::Maximize,
                seed: 1,
            },
            space,
        )
    }

    /// Runs the search with a fake trainer: metric = f(lr) + epochs / R.
    fn simulate(c: &mut Controller, f: impl Fn(f64) -> f64) -> Vec<Action> {
        let mut log = Vec::new();
        let r = c.settings.epochs as f64;
        for _ in 0..1000 {
            let actions = c.schedule();
            if actions.is_empty() && c.finished() {
                break;
            }
            for a in actions {
                let Action::Run { trial, epochs } = a;
                log.push(a.clone());
                let lr = c.trials[trial].params["train.optim.lr"].as_f64().unwrap();
                c.handle(Event::Metric {
                    trial,
                    epoch: epochs,
                    value: f(lr) + epochs as f64 / r,
                });
                c.handle(Event::Exited {
                    trial,
                    error: None,
                    minutes: epochs as f64,
                });
            }
        }
        log
    }

    #[test]
    fn hyperband_rungs_follow_r_and_nu() {
        assert_eq!(
            controller(Algorithm::Hyperband, 9, 1, 27).rungs(),
            vec![1, 3, 9, 27]
        );
        assert_eq!(
            controller(Algorithm::Hyperband, 9, 1, 6).rungs(),
            vec![2, 6]
        );
        assert_eq!(controller(Algorithm::Hyperband, 9, 1, 2).rungs(), vec![2]);
        assert_eq!(controller(Algorithm::Random, 9, 1, 27).rungs(), vec![27]);
    }

    #[test]
    fn random_runs_every_trial_to_the_end_at_most_k_at_once() {
        let mut c = controller(Algorithm::Random, 5, 2, 4);
        let first = c.schedule();
        assert_eq!(first.len(), 2);
        assert!(c.schedule().is_empty(), "two run already");
        let mut c = controller(Algorithm::Random, 5, 2, 4);
        let log = simulate(&mut c, |lr| lr);
        assert_eq!(log.len(), 5);
        assert!(log
            .iter()
            .all(|a| matches!(a, Action::Run { epochs: 4, .. })));
        assert!(c.trials.iter().all(|t| t.state == TrialState::Done));
    }

    #[test]
    fn hyperband_promotes_the_top_third_and_pauses_the_rest() {
        let mut c = controller(Algorithm::Hyperband, 9, 1, 9);
        // Best near lr = 1e-4.
        let log = simulate(&mut c, |lr| -((lr.ln() - 1e-4f64.ln()).abs()));
        let full: Vec<usize> = c
            .trials
            .iter()
            .filter(|t| t.state == TrialState::Done)
            .map(|t| t.id)
            .collect();
        let to3 = log
            .iter()
            .filter(|a| matches!(a, Action::Run { epochs: 3, .. }))
            .count();
        assert_eq!(c.trials.len(), 9);
        // Asynchronous: a trial is promoted as soon as it is in the top third of those at its
        // rung so far, so a few more than 9/3 and 3/3 go up than synchronous halving would.
        assert!(
            (3..=4).contains(&to3),
            "9 trials at rung 1 → 3 or 4 to 3 epochs: {log:?}"
        );
        assert!(
            (1..=2).contains(&full.len()),
            "→ 1 or 2 to 9 epochs: {log:?}"
        );
        // The best trial is one that ran to the end.
        assert!(full.contains(&c.best().unwrap().id));
        // A promoted trial resumes (same id, more epochs): nothing ran twice.
        let mut seen = std::collections::BTreeSet::new();
        for a in &log {
            let Action::Run { trial, epochs } = a;
            assert!(seen.insert((*trial, *epochs)), "{a:?} twice");
        }
    }

    #[test]
    fn a_saved_search_resumes_its_running_trials_and_goes_on() {
        let mut c = controller(Algorithm::Bayesian, 6, 2, 2);
        let started = c.schedule();
        assert_eq!(started.len(), 2);
        let saved = serde_json::to_string(&c).unwrap();
        let mut back: Controller = serde_json::from_str(&saved).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            back.interrupted(),
            started,
            "the running trials are run again"
        );
        for a in back.interrupted() {
            let Action::Run { trial, epochs } = a;
            back.handle(Event::Metric {
                trial,
                epoch: epochs,
                value: 0.1,
            });
            back.handle(Event::Exited {
                trial,
                error: None,
                minutes: 1.0,
            });
        }
        simulate(&mut back, |lr| lr);
        assert_eq!(back.trials.len(), 6);
    }

    #[test]
    fn a_failed_trial_is_recorded_and_the_search_goes_on() {
        let mut c = controller(Algorithm::Random, 3, 1, 1);
        let Action::Run { trial, .. } = c.schedule()[0].clone();
        c.handle(Event::Exited {
            trial,
            error: Some("out of memory".into()),
            minutes: 0.1,
        });
        let log = simulate(&mut c, |lr| lr);
        assert_eq!(log.len(), 2);
        assert!(matches!(c.trials[0].state, TrialState::Failed { .. }));
        assert_ne!(c.best().unwrap().id, 0);
    }
}
