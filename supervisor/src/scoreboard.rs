//! The shared-memory scoreboard: one slot per worker.
