//! Fault injection. (Stub: a helper writes this.)

#[derive(Debug, Default)]
pub struct Controller;

#[derive(Debug)]
pub struct FaultyDisk;
