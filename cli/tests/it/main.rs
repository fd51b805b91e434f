//! The CLI's integration tests, linked into one binary: one module per
//! concern, named as the test files used to be, so
//! `cargo test -p oxcow-cli --test it NAME::` runs one of them. Shared
//! helpers live in `support`.

mod support;

mod alloc_layout;
mod amend_dropin;
mod bitmap_cli;
mod bitmap_dropin;
mod blkdebug_breaks;
mod cache_mode_cli;
mod check_cli;
mod check_repair_words;
mod cli_behaviour;
mod convert_sources;
mod cor_filter;
mod damaged_cli;
mod data_file_opts;
mod detect_zeroes;
mod direct_write_race;
mod dropin;
mod dropin_img;
mod http_nginx;
mod ignore_journal_cli;
mod image_opts_names;
mod iotests_ci;
mod json_names;
mod legacy_aes;
mod lifecycle_cli;
mod luks_amend;
mod luks_chain;
mod luks_ciphers;
mod luks_commands;
mod luks_create;
mod luks_qcow2;
mod luks_serve;
mod nbd_list;
mod nbd_offset;
mod nested_formats;
mod other_formats;
mod prealloc_cli;
mod qcow2_cache_opts;
mod read_compat;
mod remote_cli;
mod s3_garage_cli;
mod serve_cli;
mod small_filesystem;
mod storage_daemon_cli;
mod storage_daemon_fd;
mod storage_daemon_fuse;
mod storage_daemon_guest;
mod storage_daemon_qcow2_opts;
mod storage_daemon_vhost;
mod storage_daemon_vhost_guest;
mod storage_daemon_vhost_reconnect;
mod tls_hostile;
mod tls_interop;
mod tls_libnbd_python;
mod tls_psk;
mod tls_refusals;
mod vm_state;
mod write_diff;
