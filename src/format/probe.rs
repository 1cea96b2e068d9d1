//! Recognizes what a disk already holds, so `init` never overwrites a
//! partition table or filesystem without `--force`.
