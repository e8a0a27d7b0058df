//! Status, the last step of a reconcile: recomputed whole from what was declared and
//! what was observed, never read-modify-written. Pure: `workspace` for one workspace
//! (from the rules' view of it), `team` for a Team's roll-up of its members, `pool`
//! for a WarmPool's members.

pub mod pool;
pub mod team;
pub mod workspace;
