//! The `lienthong` program, linked into the test package so its integration tests can
//! start, kill and restart the real binary (`CARGO_BIN_EXE_lienthong-under-test`).

fn main() -> std::process::ExitCode {
    lienthong_cli::main()
}
