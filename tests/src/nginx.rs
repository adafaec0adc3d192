//! nginx.
/// Placeholder until the nginx harness lands.
pub struct Nginx;
