use crate::cli::{MountArgs, UmountArgs};
use crate::error::{Error, Result};

pub fn run(_args: &MountArgs, _verbose: u8) -> Result<i32> {
    Err(Error::Invalid("mount is not implemented yet".into()))
}

pub fn umount(_args: &UmountArgs) -> Result<i32> {
    Err(Error::Invalid("umount is not implemented yet".into()))
}
