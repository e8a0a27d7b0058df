//! TODO
pub struct DockerRuntime;
