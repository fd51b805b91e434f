//! One module per subcommand.

pub mod bench;
pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod info;
pub mod io;
pub mod map;
pub mod serve;
