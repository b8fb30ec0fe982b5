//! The `vdiskfs` binary: everything is in the library (`commands`, private to it).

fn main() {
    vdiskfs::main_entry()
}
