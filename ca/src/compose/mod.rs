//! `ca inject`'s access to the local engine, and `ca trust`, which puts the
//! fleet's root where a person's tools find it.

pub mod engine;
pub mod trust;
