//! Virtual PC / Virtual Server Hyper-V VHDX (MS-VHDX).

use std::path::Path;

use crate::error::{Error, Result};
use crate::layer::OpenOptions;

pub struct Vhdx;

impl Vhdx {
    pub fn open(path: &Path, _opts: OpenOptions) -> Result<crate::image::raw::Raw> {
        Err(Error::unsupported(path, "VHDX is not implemented yet"))
    }
}
