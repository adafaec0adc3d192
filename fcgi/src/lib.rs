//! FastCGI 1.0.
