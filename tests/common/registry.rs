//! A schema registry in-process, speaking the Confluent REST API the way Confluent Schema
//! Registry and Apicurio's `ccompat` API do (the subset sluice uses: register a version, get a
//! schema by id, get a subject's version), so `cargo test` needs no registry installed. The
//! end-to-end suite runs against a real Apicurio Registry.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    /// Global ids: (schema type, text), id = index + 1.
    schemas: Vec<(String, String)>,
    /// Subject → ids of its versions, oldest first.
    subjects: Vec<(String, Vec<u32>)>,
}

pub struct TestRegistry {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// While set, every request is answered 503 (an outage).
    down: Arc<AtomicBool>,
    /// Requests for schemas by id, answered or not.
    pub lookups: Arc<AtomicU64>,
}

impl TestRegistry {
    pub async fn start() -> TestRegistry {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = TestRegistry {
            addr,
            state: Arc::default(),
            down: Arc::default(),
            lookups: Arc::default(),
        };
        let (state, down, lookups) = (
            registry.state.clone(),
            registry.down.clone(),
            registry.lookups.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, down, lookups) = (state.clone(), down.clone(), lookups.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let (state, down, lookups) =
                                (state.clone(), down.clone(), lookups.clone());
                            async move {
                                let (parts, body) = request.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                if parts.uri.path().starts_with("/schemas/ids/") {
                                    lookups.fetch_add(1, Ordering::SeqCst);
                                }
                                let (status, value) = if down.load(Ordering::SeqCst) {
                                    (
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        Value::String("down".into()),
                                    )
                                } else {
                                    answer(&state, &parts.method, parts.uri.path(), &body)
                                };
                                Ok::<_, Infallible>(
                                    Response::builder()
                                        .status(status)
                                        .header(
                                            "content-type",
                                            "application/vnd.schemaregistry.v1+json",
                                        )
                                        .body(Full::new(Bytes::from(value.to_string())))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        registry
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts or ends an outage.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

fn not_found(message: String) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"error_code": 40403, "message": message}),
    )
}

fn answer(state: &Mutex<State>, method: &Method, path: &str, body: &[u8]) -> (StatusCode, Value) {
    let mut state = state.lock().unwrap();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let schema_body = |state: &State, id: u32| {
        let (kind, text) = &state.schemas[id as usize - 1];
        let mut v = json!({"schema": text, "id": id});
        if kind != "AVRO" {
            v["schemaType"] = kind.clone().into();
        }
        v
    };
    match (method, segments.as_slice()) {
        (&Method::GET, ["schemas", "ids", id]) => match id.parse::<u32>() {
            Ok(id) if id >= 1 && (id as usize) <= state.schemas.len() => {
                (StatusCode::OK, schema_body(&state, id))
            }
            _ => not_found(format!("Schema {id} not found")),
        },
        (&Method::POST, ["subjects", subject, "versions"]) => {
            let request: Value = serde_json::from_slice(body).unwrap_or_default();
            let text = request["schema"].as_str().unwrap_or_default().to_string();
            let kind = request["schemaType"].as_str().unwrap_or("AVRO").to_string();
            let id = match state
                .schemas
                .iter()
                .position(|s| *s == (kind.clone(), text.clone()))
            {
                Some(i) => i as u32 + 1,
                None => {
                    state.schemas.push((kind, text));
                    state.schemas.len() as u32
                }
            };
            let subject = subject.to_string();
            match state.subjects.iter_mut().find(|(s, _)| *s == subject) {
                Some((_, ids)) if ids.contains(&id) => {}
                Some((_, ids)) => ids.push(id),
                None => state.subjects.push((subject, vec![id])),
            }
            (StatusCode::OK, json!({"id": id}))
        }
        (&Method::GET, ["subjects", subject, "versions", version]) => {
            let found =
                state.subjects.iter().find(|(s, _)| s == subject).and_then(
                    |(_, ids)| match *version {
                        "latest" => ids.last().copied(),
                        v => v
                            .parse::<usize>()
                            .ok()
                            .and_then(|v| ids.get(v.checked_sub(1)?).copied()),
                    },
                );
            match found {
                Some(id) => (StatusCode::OK, schema_body(&state, id)),
                None => (
                    StatusCode::NOT_FOUND,
                    json!({"error_code": 40402, "message": "Version not found"}),
                ),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            json!({"error_code": 404, "message": "HTTP 404 Not Found"}),
        ),
    }
}
