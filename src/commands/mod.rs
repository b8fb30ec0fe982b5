//! The subcommands: thin layers over `Chain` and `Disk`.

pub mod cat;
pub mod check;
pub mod compact;
pub mod convert;
pub mod create;
pub mod generate;
pub mod info;
pub mod mount;
pub mod mount_helper;

use crate::cli::{Cli, Command};
use crate::error::Result;

/// Run a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Info(a) => info::run(&a),
        Command::Cat(a) => cat::run(&a),
        Command::Create(a) => create::run(&a),
        Command::Check(a) => check::run(&a),
        Command::Convert(a) => convert::run(&a),
        Command::Mount(a) => mount::run(&a, cli.verbose),
        Command::Umount(a) => mount::umount(&a),
        Command::Generate(a) => generate::run(&a),
        Command::Compact(a) => compact::run(&a),
    }
}
