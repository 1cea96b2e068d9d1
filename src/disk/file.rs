//! Regular files and block devices. (Stub: a helper writes this.)

#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub direct: bool,
    pub read_only: bool,
}

#[derive(Debug)]
pub struct FileDisk;
