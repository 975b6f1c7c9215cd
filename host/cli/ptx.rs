//! `speckv ptx`: the embedded PTX module, for engines that load it themselves.

use speckv::ptx::Arch;

#[derive(clap::Args)]
pub struct Args {
    /// sm_80 or sm_90.
    #[arg(long, default_value = "sm_90")]
    arch: String,
    /// Output file (default: standard output).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

pub fn run(a: Args) -> speckv::Result<()> {
    let ptx = Arch::parse(&a.arch)?.ptx()?;
    match a.out {
        Some(path) => std::fs::write(&path, ptx).map_err(|source| speckv::Error::Io {
            context: format!("writing {}", path.display()),
            source,
        }),
        None => {
            print!("{ptx}");
            Ok(())
        }
    }
}
