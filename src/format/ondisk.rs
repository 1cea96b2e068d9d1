//! Reading and writing one disk's metadata: partition table, both labels,
//! both config slots. No policy: which config is current is the group's call.
