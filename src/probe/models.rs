//! Model discovery: `GET /v1/models` (the OpenAI list format) from each endpoint of a
//! region with `discover_models = true`, read right after each passed probe, so a model
//! added to a server is routed to without a reload. A failed read keeps the last list.

use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use serde::Deserialize;

use crate::forward::endpoint_get::endpoint_get;
use crate::health::EndpointHealth;
use crate::runtime::Snapshot;

/// Model lists past this size are not read.
const MAX_LIST: usize = 1024 * 1024;

/// The path of the OpenAI model list.
pub(crate) const MODELS_PATH: &str = "/v1/models";

/// The model ids of an OpenAI list answer: `{"object":"list","data":[{"id":...},...]}`.
pub(crate) fn parse_list(body: &[u8]) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct List {
        data: Vec<Model>,
    }
    #[derive(Deserialize)]
    struct Model {
        id: String,
    }
    let list: List = serde_json::from_slice(body).map_err(|e| format!("not an OpenAI model list: {e}"))?;
    let mut ids: Vec<String> = list.data.into_iter().map(|m| m.id).collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Reads `health`'s model list if its region discovers models, and stores it.
pub(crate) async fn discover(rt: &Snapshot, health: &Arc<EndpointHealth>) {
    let Some((config, endpoint)) = rt.endpoint_of(health) else {
        return;
    };
    if !config.discover_models {
        return;
    }
    let timeout = config.probe.timeout.unwrap_or(rt.config.health.timeout);
    let reading = async {
        let req = endpoint_get(&endpoint.config, MODELS_PATH, "meridian-model-discovery")?;
        let resp = rt
            .upstreams
            .send(req, endpoint.config.protocol, timeout)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_LIST)
            .collect()
            .await
            .map_err(|e| format!("reading the list: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("status {}", status.as_u16()));
        }
        parse_list(&body)
    };
    let reading = match tokio::time::timeout(timeout, reading).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    match reading {
        Ok(models) => {
            let changed = health.models.load().as_deref() != Some(&models);
            if changed {
                tracing::info!(region = %health.region, endpoint = %health.url, models = ?models, "models discovered");
                health.models.store(Some(Arc::new(models)));
            }
        }
        Err(error) => {
            tracing::debug!(region = %health.region, endpoint = %health.url, %error, "model discovery failed; keeping the last list");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_list_table() {
        let cases: [(&str, Result<Vec<&str>, ()>); 4] = [
            (
                r#"{"object":"list","data":[{"id":"meta-llama/Llama-3.1-8B-Instruct","object":"model","created":1733050000,"owned_by":"vllm","root":"meta-llama/Llama-3.1-8B-Instruct","parent":null,"max_model_len":131072,"permission":[]},{"id":"lora-a","object":"model","owned_by":"vllm","parent":"meta-llama/Llama-3.1-8B-Instruct"}]}"#,
                Ok(vec!["lora-a", "meta-llama/Llama-3.1-8B-Instruct"]),
            ),
            (r#"{"object":"list","data":[]}"#, Ok(vec![])),
            (r#"{"models":["x"]}"#, Err(())),
            ("<html>", Err(())),
        ];
        for (body, want) in cases {
            let got = parse_list(body.as_bytes()).map_err(|_| ());
            assert_eq!(got, want.map(|v| v.into_iter().map(String::from).collect()), "{body}");
        }
    }
}
