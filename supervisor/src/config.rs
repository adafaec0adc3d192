//! Configuration: TOML file + CLI flags, validated once into typed values.
