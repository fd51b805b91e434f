//! One module per subcommand.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod convert_concat;
pub mod create;
pub mod dd;
pub mod info;
pub mod io;
mod io_aio;
pub mod io_limits;
mod io_reopen;
mod io_vmstate;
mod io_zeroes;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod serve;
pub mod snapshot;
pub mod stream;
