//! The OpenAPI 3.1 document, built from the endpoint table and the JSON Schemas of the very
//! types the handlers deserialize.

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use super::endpoints::{Body, Endpoint};

/// Every error code a client may see, in one place for the document.
const ERROR_DESCRIPTION: &str = "A refusal: `{\"error\": {\"code\", \"message\"}}`. The code is stable; the message is a sentence for a person.";

pub fn document(endpoints: &[Endpoint]) -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let mut paths = Map::new();
    for e in endpoints {
        let mut op = Map::new();
        op.insert("operationId".into(), json!(e.operation));
        op.insert("summary".into(), json!(e.summary));
        let roles: Vec<&str> = e.roles.iter().map(|r| r.as_str()).collect();
        op.insert("x-roles".into(), json!(roles));
        op.insert("x-audited".into(), json!(e.audited));
        if !e.roles.is_empty() {
            op.insert("security".into(), json!([{ "bearer": [] }]));
        }
        let mut parameters: Vec<Value> = e
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        if let Some(query) = e.query {
            // Query parameters: the properties of the query type, inlined.
            let mut inline = SchemaSettings::draft2020_12()
                .with(|s| s.inline_subschemas = true)
                .into_generator();
            let schema = query(&mut inline).to_value();
            let required: Vec<&str> = schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for (name, prop) in schema["properties"].as_object().into_iter().flatten() {
                parameters.push(json!({
                    "name": name,
                    "in": "query",
                    "required": required.contains(&name.as_str()),
                    "schema": prop,
                }));
            }
        }
        if !parameters.is_empty() {
            op.insert("parameters".into(), Value::Array(parameters));
        }
        match e.body {
            Body::None => {}
            Body::Json { schema, required } => {
                op.insert(
                    "requestBody".into(),
                    json!({
                        "required": required,
                        "content": { "application/json": { "schema": schema(&mut generator).to_value() } },
                    }),
                );
            }
            Body::Wasm => {
                op.insert(
                    "requestBody".into(),
                    json!({
                        "required": true,
                        "content": { "application/wasm": { "schema": { "type": "string", "contentMediaType": "application/wasm" } } },
                    }),
                );
            }
        }
        let success = e.success.as_u16().to_string();
        op.insert(
            "responses".into(),
            json!({
                success: { "description": e.success.canonical_reason().unwrap_or("success") },
                "4XX": { "description": ERROR_DESCRIPTION, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
            }),
        );
        paths
            .entry(e.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("path items are objects")
            .insert(e.method.as_str().to_lowercase(), Value::Object(op));
    }
    let mut schemas = generator.take_definitions(true);
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": { "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": { "code": { "type": "string" }, "message": { "type": "string" } },
            }},
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "unseen",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Compute on sensitive public data without seeing it. Every call but /v1/health and this document needs `Authorization: Bearer <token>`; `x-roles` names the roles that may call an operation (ownership is checked on top). Responses carry an `x-request-id` header that the audit log records.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    })
}
