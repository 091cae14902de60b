//! `sidecar`: Lanyard's data plane command. Thin over `lanyard_sidecar`.

fn main() -> std::process::ExitCode {
    lanyard_sidecar::command::main()
}
