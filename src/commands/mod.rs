//! The subcommands: thin layers over `Chain` and `Disk`.

pub mod cat;
pub mod check;
pub mod compact;
pub mod convert;
pub mod create;
pub mod generate;
pub mod info;
pub mod merge;
pub mod mount;
pub mod mount_helper;
pub mod resize;
pub mod set_parent;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::cli::{Cli, Command};
use crate::error::{Error, Result};

/// A flag that SIGINT and SIGTERM set (the long verbs stop between pieces when it is);
/// `path` names the file an error installing the handlers is reported against.
fn cancel_on_signals(path: &Path) -> Result<Arc<AtomicBool>> {
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone())
            .map_err(|e| Error::file(path, "install a signal handler", e))?;
    }
    Ok(cancel)
}

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
        Command::SetParent(a) => set_parent::run(&a),
        Command::Resize(a) => resize::run(&a),
        Command::Merge(a) => merge::run(&a),
        Command::Compact(a) => compact::run(&a),
    }
}

/// The `vdiskfs` binary's `main` (`src/main.rs` calls only this): the mount helper
/// protocol or the command line, logging, one `vdiskfs: ...` line on error, the exit
/// code.
pub fn main_entry() -> ! {
    // `vdiskfs IMAGE MOUNTPOINT -o ...` (from mount.fuse3) or `mount.vdiskfs ...` (from
    // mount(8)): the mount helper protocol, outside clap.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(call) = mount_helper::parse_argv(&argv) {
        match call {
            Ok(mount_helper::HelperCall::Mount(args, verbose)) => {
                init_logging(verbose);
                exit_with(mount::run(&args, verbose));
            }
            Ok(mount_helper::HelperCall::Fake) => std::process::exit(0),
            Ok(mount_helper::HelperCall::Help) => {
                println!("{}", mount_helper::USAGE);
                std::process::exit(0);
            }
            Err(e) => exit_with(Err(e)),
        }
    }
    let cli = <Cli as clap::Parser>::parse();
    init_logging(cli.verbose);
    exit_with(run(cli));
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp(None)
        .init();
}

fn exit_with(result: Result<i32>) -> ! {
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vdiskfs: {e}");
            std::process::exit(1);
        }
    }
}
