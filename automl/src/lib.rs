//! Hyper-parameter search over a ddetr train spec (`ddetr automl`): the search space
//! ([`space`]), the algorithms (random, Bayesian optimisation with a Gaussian process
//! ([`bayes`]), Hyperband's rungs run as asynchronous successive halving) and the controller
//! ([`controller`]): a state machine with no processes and no clock, saved by the driver after
//! every event so a killed search continues where it was.

pub mod bayes;
pub mod controller;
pub mod rng;
pub mod space;

pub use controller::{
    Action, Algorithm, Controller, Direction, Event, Settings, Trial, TrialState,
};
pub use space::{Domain, Param, Point, Space, SpaceError};
