//! Helpers for Lanyard's end-to-end tests: locate the built binaries, run
//! them loudly, build PKI fixtures, and tear child processes down on drop.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod pebble;
mod pki;
mod process;
mod redis;
mod servers;
mod upstreams;

pub use pebble::*;
pub use pki::*;
pub use process::*;
pub use redis::*;
pub use servers::*;
pub use upstreams::*;
