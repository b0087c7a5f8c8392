//! The `lienthong` binary: everything lives in the `lienthong_cli` library.

// Every hop allocates per document (decoded messages, sled's node copies, receipts):
// with glibc's allocator that was about a third of each process's CPU in scenario 1's
// profile (docs/benchmarks.md); mimalloc's thread-local free lists cost a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    lienthong_cli::main()
}
