use crate::cli::CreateArgs;
use crate::error::{Error, Result};

pub fn run(_args: &CreateArgs) -> Result<i32> {
    Err(Error::Invalid("create is not implemented yet".into()))
}
