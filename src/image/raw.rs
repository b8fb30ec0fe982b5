//! A raw file as a base layer: every byte is held, at the same offset.

use std::path::Path;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::image::ImageFile;
use crate::layer::{push_run, Format, Layer, LayerInfo, OpenOptions, ParentRef, Run};

pub struct Raw {
    file: ImageFile,
    size: u64,
}

impl Raw {
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self> {
        if opts.writable {
            return Err(Error::Invalid(format!(
                "{}: a raw file can only be a read-only base, not the top of a writable chain",
                path.display()
            )));
        }
        let file = ImageFile::open_with(path, opts)?;
        let size = file.len();
        Ok(Raw { file, size })
    }
}

impl Layer for Raw {
    fn path(&self) -> &Path {
        &self.file.path
    }
    fn written_by(&self) -> Option<&str> {
        self.file.writer.as_deref()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn map(&self, offset: u64, len: u64, runs: &mut Vec<Run>) -> Result<()> {
        push_run(
            runs,
            Run::Held {
                len,
                file_offset: offset,
            },
        );
        Ok(())
    }
    fn read_held(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, file_offset)
    }
    fn parent(&self) -> Option<&ParentRef> {
        None
    }
    fn linkage_id(&self) -> Option<Uuid> {
        None
    }
    fn info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            disk_type: "raw".into(),
            virtual_size: self.size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            bytes_held: self.size,
            ..Default::default()
        })
    }
}
