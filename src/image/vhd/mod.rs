//! Virtual PC / Virtual Server VHD (Virtual Hard Disk Image Format Specification 1.0).

use std::path::Path;

use crate::error::{Error, Result};
use crate::layer::OpenOptions;

pub struct Vhd;

impl Vhd {
    pub fn open(path: &Path, _opts: OpenOptions) -> Result<crate::image::raw::Raw> {
        Err(Error::unsupported(path, "VHD is not implemented yet"))
    }
}
