//! The one module allowed `unsafe`: fork, shared memory, raw fds.
#![allow(unsafe_code)]
