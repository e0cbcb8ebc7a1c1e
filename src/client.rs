//! A small client for a running server: what the CLI's operator and auditor commands use,
//! so that a deployment can be scripted.

use anyhow::Context;
use reqwest::Method;
use serde_json::Value;

pub struct Remote {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Remote {
    pub fn new(server: &str, token: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            server.starts_with("http://") || server.starts_with("https://"),
            "--server must be an http:// or https:// URL, not {server:?}"
        );
        Ok(Remote {
            base: server.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()?,
        })
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Uploads a wasm module; answers the server's JSON (`id`, `entries`, `size`).
    pub async fn upload(&self, wasm: &[u8]) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}/v1/modules", self.base))
            .bearer_auth(&self.token)
            .header("content-type", "application/wasm")
            .body(wasm.to_vec())
            .send()
            .await?;
        Self::answer(resp)
            .await
            .map(|b| serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    async fn answer(resp: reqwest::Response) -> anyhow::Result<Vec<u8>> {
        let status = resp.status();
        let bytes = resp.bytes().await?.to_vec();
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            anyhow::bail!(
                "{} ({}): {}",
                v["error"]["code"].as_str().unwrap_or("http_error"),
                status.as_u16(),
                v["error"]["message"].as_str().unwrap_or("no message")
            );
        }
        Ok(bytes)
    }

    /// Calls an endpoint; answers the body, or fails with the server's code and message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Vec<u8>> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {}{path}", self.base))?;
        Self::answer(resp).await
    }

    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let bytes = self.call(method, path, body).await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}
