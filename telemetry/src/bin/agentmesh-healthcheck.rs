//! `agentmesh-healthcheck [PATH]`: the container image's `HEALTHCHECK`.
//!
//! The runtime image has no shell, curl or wget, so this asks the service
//! in the same container itself: `GET http://127.0.0.1:$AGENTMESH_HTTP_PORT<PATH>`
//! (default path `/healthz`, default port 9090), exit 0 on `200`, 1
//! otherwise, within 3 seconds.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let path = std::env::args().nth(1).unwrap_or_else(|| "/healthz".into());
    let port = std::env::var("AGENTMESH_HTTP_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(9090);
    match check(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), &path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("agentmesh-healthcheck: {why}");
            ExitCode::FAILURE
        }
    }
}

fn check(addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("`{addr}`: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("`{addr}`: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("`{addr}`: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let status = response.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("`{path}` answered `{status}`"))
    }
}
