//! `lienthong pki dev`: a development PKI (never for production).

use std::path::PathBuf;

use clap::Subcommand;
use lienthong_certs_dev::{DEFAULT_AGENCIES, write_dev_pki};

use crate::error::CliError;
use crate::output::errln;

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Write a dev CA, broker, operator and agency certificates into DIR.
    Dev {
        /// TOML configuration file with `out` and `agencies` keys; flags win.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Agency code to issue a certificate for (repeatable). Default: three
        /// agencies of Hưng Yên province.
        #[arg(long = "agency", value_name = "CODE")]
        agencies: Vec<String>,
    },
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PkiFile {
    out: Option<PathBuf>,
    #[serde(default)]
    agencies: Vec<String>,
}

/// The keys the `--config` file takes (for `lienthong docs configuration`).
pub(crate) fn config_keys() -> &'static [&'static str] {
    crate::config::keys::<PkiFile>()
}

pub fn run(command: PkiCommand) -> Result<(), CliError> {
    match command {
        PkiCommand::Dev {
            config,
            out,
            agencies,
        } => {
            let file: PkiFile = crate::config::load(config.as_deref())?;
            let out = crate::config::required(
                out,
                file.out
                    .map(|p| crate::config::relative_to(config.as_deref(), p)),
                "out",
            )?;
            let agencies = if agencies.is_empty() {
                file.agencies
            } else {
                agencies
            };
            for code in &agencies {
                lienthong_proto::AgencyCode::parse(code)
                    .map_err(|e| CliError::Usage(format!("--agency: {e}")))?;
            }
            let agencies = if agencies.is_empty() {
                DEFAULT_AGENCIES.iter().map(|c| (*c).to_owned()).collect()
            } else {
                agencies
            };
            let paths = write_dev_pki(&out, &agencies)
                .map_err(|e| CliError::Failed(format!("cannot write the dev PKI: {e}")))?;
            errln!(
                "development PKI in {} (not for production):",
                paths.dir.display()
            );
            errln!("  CA        {}", paths.ca_cert.display());
            errln!("  broker    {}", paths.broker_cert.display());
            errln!("  operator  {}", paths.operator_cert.display());
            for (code, cert, _) in &paths.agencies {
                errln!("  {code}  {}", cert.display());
            }
            Ok(())
        }
    }
}
