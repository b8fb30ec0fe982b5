use clap::Parser;

use vdiskfs::cli::Cli;
use vdiskfs::commands::mount_helper::{self, HelperCall};

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

fn exit_with(result: vdiskfs::Result<i32>) -> ! {
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vdiskfs: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    // `vdiskfs IMAGE MOUNTPOINT -o ...` (from mount.fuse3) or `mount.vdiskfs ...` (from
    // mount(8)): the mount helper protocol, outside clap.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(call) = mount_helper::parse_argv(&argv) {
        match call {
            Ok(HelperCall::Mount(args, verbose)) => {
                init_logging(verbose);
                exit_with(vdiskfs::commands::mount::run(&args, verbose));
            }
            Ok(HelperCall::Fake) => std::process::exit(0),
            Ok(HelperCall::Help) => {
                println!("{}", mount_helper::USAGE);
                std::process::exit(0);
            }
            Err(e) => exit_with(Err(e)),
        }
    }
    let cli = Cli::parse();
    init_logging(cli.verbose);
    exit_with(vdiskfs::commands::run(cli));
}
