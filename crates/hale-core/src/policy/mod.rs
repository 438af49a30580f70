//! Pure supervision policies: restart backoff, restart intensity, and the phi-accrual
//! failure detector. Each is a function of the time it is given (and, for backoff, of the
//! core's seeded [`Rng`](crate::Rng)); none reads a clock.

mod backoff;
mod intensity;
mod phi;

pub use backoff::Backoff;
pub use intensity::{Intensity, RestartWindow};
pub use phi::{PhiConfig, PhiDetector};
