//! `vdiskfs info`: the chain, top to base.

use crate::chain::Chain;
use crate::cli::InfoArgs;
use crate::error::Result;

pub fn run(args: &InfoArgs) -> Result<i32> {
    let chain = Chain::open(&args.image, &args.chain.options(false))?;
    for (i, l) in chain.layers.iter().enumerate() {
        let info = l.info()?;
        println!("layer {i}: {} {:?}", l.path().display(), info);
    }
    Ok(0)
}
