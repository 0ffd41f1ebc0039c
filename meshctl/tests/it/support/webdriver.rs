//! A small WebDriver client for the UI tests: HTTP/1.1 on hyper (already in
//! the tree), JSON bodies, and the handful of W3C WebDriver commands the
//! tests use, against `chromedriver` driving headless Chromium.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use testkit::{Service, WAIT, find_binary, free_port};

/// One HTTP request; returns the status and the body as text.
pub(crate) async fn http(
    method: &str,
    url: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, String)> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("`{url}`"))?;
    let authority = uri.authority().context("a URL without host")?.clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let payload = body.map(Value::to_string).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority.as_str())
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(payload)))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// `chromedriver` on a port of the test's own, killed on drop.
pub(crate) struct Driver {
    url: String,
    _service: Service,
}

impl Driver {
    /// Starts chromedriver and waits until it reports ready.
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let binary = find_binary("chromedriver", "CHROMEDRIVER_BIN", "chromium-driver")?;
        let port = free_port()?;
        let mut service = Service::spawn(Command::new(binary).arg(format!("--port={port}")))?;
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        service
            .wait_until(WAIT, "chromedriver to be ready", || {
                let status = status.clone();
                async move {
                    let (code, body) = http("GET", &status, None).await.ok()?;
                    let ready =
                        serde_json::from_str::<Value>(&body).ok()?["value"]["ready"] == true;
                    (code == 200 && ready).then_some(())
                }
            })
            .await?;
        Ok(Self {
            url,
            _service: service,
        })
    }

    /// A new headless Chromium session (`--no-sandbox`: tests may run as root).
    pub(crate) async fn session(&self) -> anyhow::Result<Session> {
        let chromium = find_binary("chromium", "CHROMIUM_BIN", "chromium")?;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1360,900",
                         "--hide-scrollbars", "--force-device-scale-factor=1"],
            },
        }}});
        let value = command(&self.url, "POST", "/session", Some(&capabilities)).await?;
        let id = value["sessionId"]
            .as_str()
            .context("no sessionId in the new session's answer")?;
        Ok(Session {
            base: format!("{}/session/{id}", self.url),
        })
    }
}

async fn command(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let (status, text) = http(method, &format!("{base}{path}"), body).await?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("WebDriver {method} {path} answered {status}: {text}"))?;
    if status != 200 {
        bail!(
            "WebDriver {method} {path} answered {status}: {}",
            value["value"]
        );
    }
    Ok(value["value"].clone())
}

/// A browser session; closed on [`Session::quit`].
pub(crate) struct Session {
    base: String,
}

impl Session {
    /// Opens `url` and waits for it to load.
    pub(crate) async fn goto(&self, url: &str) -> anyhow::Result<()> {
        command(&self.base, "POST", "/url", Some(&json!({ "url": url }))).await?;
        Ok(())
    }

    /// The current URL.
    pub(crate) async fn url(&self) -> anyhow::Result<String> {
        let value = command(&self.base, "GET", "/url", None).await?;
        Ok(value.as_str().unwrap_or_default().to_owned())
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub(crate) async fn run(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        let body = json!({ "script": script, "args": args });
        command(&self.base, "POST", "/execute/sync", Some(&body)).await
    }

    /// Clicks the first element matching `css`, as a user would.
    pub(crate) async fn click(&self, css: &str) -> anyhow::Result<()> {
        let body = json!({ "using": "css selector", "value": css });
        let element = command(&self.base, "POST", "/element", Some(&body)).await?;
        let id = element
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .with_context(|| format!("no element id for `{css}`: {element}"))?;
        command(
            &self.base,
            "POST",
            &format!("/element/{id}/click"),
            Some(&json!({})),
        )
        .await?;
        Ok(())
    }

    /// A PNG of the viewport, written to `path`.
    pub(crate) async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine as _;
        let value = command(&self.base, "GET", "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD.decode(
            value
                .as_str()
                .context("a screenshot that is not a string")?,
        )?;
        std::fs::write(path, png).with_context(|| format!("writing `{}`", path.display()))
    }

    /// Ends the session (closes the browser).
    pub(crate) async fn quit(self) -> anyhow::Result<()> {
        command(&self.base, "DELETE", "", None).await?;
        Ok(())
    }
}
