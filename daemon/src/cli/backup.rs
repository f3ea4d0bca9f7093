//! `kiln restore <backup-dir> --data-dir <empty dir>`: verifies a backup
//! taken by `kiln backup` (`POST /admin/backup`) and puts it in place, with
//! no daemon running. See [`crate::backup`].

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The backup directory (with its kiln-backup.json).
    pub backup: PathBuf,
    /// The data directory to create: absent or empty.
    #[arg(long, required = true)]
    pub data_dir: PathBuf,
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let manifest = crate::backup::restore(&args.backup, &args.data_dir)?;
    println!(
        "restored {} into {}: log head {}, {} views, {} files ({} bytes) verified; taken at \
         {} ms since the epoch by kiln {}. Start it with `kiln serve --data-dir {}`",
        args.backup.display(),
        args.data_dir.display(),
        manifest.log_head,
        manifest.views.len(),
        manifest.files.len(),
        manifest.bytes(),
        manifest.created_at_ms,
        manifest.kiln_version,
        args.data_dir.display()
    );
    Ok(())
}
