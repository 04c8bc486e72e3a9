//! Wall time per stage of the GPU work, when [`PROFILE_ENV`] is set: each stage ends with a
//! device synchronisation, so the figures are the stages' own (and the run is slower).
use std::time::Instant;

use super::{CudaDevice, CudaResult};

/// Set to profile the forward passes ([`super::model::GpuModel::stage_seconds`]) and the
/// programming and drift of the routed experts ([`super::experts::GpuExperts::stage_seconds`]).
pub const PROFILE_ENV: &str = "AIMC_PROFILE_FORWARD";

/// Time of one stage summed over its runs.
#[derive(Clone, Copy, Debug)]
pub struct StageTime {
    pub name: &'static str,
    /// Wall seconds from the stage's start until the device finished it.
    pub seconds: f64,
    /// Of those, the seconds the host took to enqueue the stage's work (launches, allocations,
    /// copies): when they are near `seconds`, the stage is bound by the host, not the kernels.
    pub host_seconds: f64,
}

/// Sums [`StageTime`]s: [`StageClock::start`] once, then [`StageClock::lap`] at each stage's end.
#[derive(Default)]
pub struct StageClock {
    last: Option<Instant>,
    stages: Vec<StageTime>,
}

impl StageClock {
    /// A clock when [`PROFILE_ENV`] is `1` (an error where it is neither `1` nor `0`).
    pub fn from_env() -> CudaResult<Option<Self>> {
        Ok(super::env::switch(PROFILE_ENV)?.then(Self::default))
    }

    /// Waits for the device's earlier work, then starts the first stage.
    pub fn start(&mut self, dev: &CudaDevice) -> CudaResult<()> {
        dev.synchronize()?;
        self.last = Some(Instant::now());
        Ok(())
    }

    /// Ends the running stage as `name` (after the device finished it); the next one starts.
    pub fn lap(&mut self, dev: &CudaDevice, name: &'static str) -> CudaResult<()> {
        let Some(last) = self.last else {
            return Ok(());
        };
        let host = last.elapsed().as_secs_f64();
        dev.synchronize()?;
        let now = Instant::now();
        let dt = (now - last).as_secs_f64();
        match self.stages.iter_mut().find(|s| s.name == name) {
            Some(s) => {
                s.seconds += dt;
                s.host_seconds += host;
            }
            None => self.stages.push(StageTime {
                name,
                seconds: dt,
                host_seconds: host,
            }),
        }
        self.last = Some(now);
        Ok(())
    }

    /// The stages so far, in first-seen order.
    pub fn stages(&self) -> &[StageTime] {
        &self.stages
    }
}

/// Starts `clock` when there is one and returns the lap function of the stages that follow
/// ([`StageClock::lap`] on it; a no-op without one).
pub fn laps<'c>(
    clock: &'c mut Option<StageClock>,
    dev: &'c CudaDevice,
) -> CudaResult<impl FnMut(&'static str) -> CudaResult<()> + 'c> {
    if let Some(c) = clock.as_mut() {
        c.start(dev)?;
    }
    Ok(move |name| clock.as_mut().map_or(Ok(()), |c| c.lap(dev, name)))
}
