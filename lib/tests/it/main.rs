//! The library's integration tests, linked into one binary (one link of
//! the crate instead of one per file): one module per concern, named as
//! the test files used to be, so `cargo test -p oxcow --test it NAME::`
//! runs one of them. Shared helpers live in `support`.

mod support;

mod blkdebug;
mod cache_modes;
mod check_vs_qemu;
mod concurrency;
mod concurrency_torture;
mod crash_sweep;
mod crash_sweep_bitmaps;
mod damaged_images;
mod direct_write_race;
mod engine_vs_qemu;
mod enospc_serve;
mod failure_scope;
mod fault_sweep;
mod formats_concurrency;
mod fuzz_corpus;
mod hostile_bitmaps;
mod hostile_images;
mod http_driver;
mod lifecycle_chain;
mod lifecycle_compress;
mod lifecycle_concurrency;
mod lifecycle_crash;
mod lifecycle_engine_race;
mod lifecycle_measure;
mod lifecycle_resize_amend;
mod lifecycle_snapshot;
mod locking;
mod luks_header;
mod metadata_writes;
mod nbd_client_oldstyle;
mod nbd_extended;
mod nbd_hostile;
mod nbd_protocol;
mod nbd_qcow2;
mod nbd_server;
mod read_qemu_images;
mod recovery_journal;
mod remote_bench;
mod remote_client;
mod remote_cor;
mod remote_cor_crash;
mod remote_cor_geometry;
mod remote_hostile;
mod remote_nbdkit;
mod s3_driver;
mod s3_garage;
mod torture_model;
mod zero_writes_vs_qemu;
