//! Signatures per second of a document-signing key on a PKCS#11 token, one document
//! per signature and 256 documents per batch signature (DESIGN section 4).
//!
//! `SOFTHSM2_CONF=... cargo run --release -p lienthong-agent --example token_sign_rate --
//!  MODULE URI PIN_FILE CERT_PEM [SECONDS]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lienthong_agent::token::{TokenConfig, open_signing_key};
use lienthong_proto::signing::Domain;

const BATCH: usize = 256;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [module, uri, pin_file, cert, rest @ ..] = args.as_slice() else {
        return Err("usage: token_sign_rate MODULE URI PIN_FILE CERT_PEM [SECONDS]".into());
    };
    let seconds: u64 = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let config = TokenConfig::new(
        uri,
        Some(PathBuf::from(module)),
        Some(PathBuf::from(pin_file)),
    )?;
    let key = open_signing_key(&std::fs::read(cert)?, config)?;
    let payload = bytes::Bytes::from(vec![0x5a; 600]);
    let span = Duration::from_secs(seconds);

    let start = Instant::now();
    let mut singles = 0u64;
    while start.elapsed() < span {
        key.sign(Domain::DocumentHeader, payload.clone())?;
        singles += 1;
    }
    let single_rate = singles as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut batches = 0u64;
    while start.elapsed() < span {
        key.sign_batch(Domain::DocumentHeader, vec![payload.clone(); BATCH])?;
        batches += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("single: {singles} signatures, {single_rate:.0} documents/s");
    println!(
        "batch of {BATCH}: {batches} signatures, {:.0} signatures/s, {:.0} documents/s",
        batches as f64 / elapsed,
        (batches * BATCH as u64) as f64 / elapsed
    );
    Ok(())
}
