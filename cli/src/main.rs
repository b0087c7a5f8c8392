//! The `lienthong` binary: everything lives in the `lienthong_cli` library.

fn main() -> std::process::ExitCode {
    lienthong_cli::main()
}
