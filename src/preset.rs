//! Server presets: for vLLM, SGLang and llama.cpp server, the routes keygate forwards, each
//! marked as an inference route (any key) or an admin route (only keys whose `routes` include
//! `"admin"`). A route not in the table is refused even with a valid key: deny by default is
//! the point, because each server leaves some of its admin routes outside its own `--api-key`.
//!
//! The tables are static data taken from each server's route registrations (the source and
//! version are in [`Preset::source`] and in README's preset table); [`Table::new`] indexes one
//! at start-up, and [`Table::class`] is all a request costs: one hash lookup, plus a scan of
//! the few patterns with `*` segments when that misses.

use std::collections::HashMap;

use http::Method;

use crate::path::plain_path;

/// Who may use a route of a preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// What client applications call to use the model: completions, embeddings, model list.
    Inference,
    /// Operating the server: metrics, profiling, caches, LoRA and weight updates, sleep.
    Admin,
}

/// Methods as bits, so one table row can name several.
const GET: u8 = 1;
const POST: u8 = 2;
const PUT: u8 = 4;
const DELETE: u8 = 8;

fn method_bit(method: &Method) -> u8 {
    match *method {
        Method::GET => GET,
        Method::POST => POST,
        Method::PUT => PUT,
        Method::DELETE => DELETE,
        _ => 0,
    }
}

/// One route: the methods it answers, its path, and who may use it. In a path, a `*` segment
/// stands for exactly one segment (an id) and a final `**` for one or more.
struct Route(u8, &'static str, Class);

use Class::{Admin as A, Inference as I};

/// A server's route list.
pub struct Preset {
    /// The name used in `[upstream] preset`.
    pub name: &'static str,
    /// Where the table was taken from.
    pub source: &'static str,
    /// The server's own health route: the probe path unless `[probe] path` says otherwise.
    pub probe: &'static str,
    routes: &'static [Route],
}

impl std::fmt::Debug for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl Preset {
    /// The preset called `name` in the config, if any.
    pub fn named(name: &str) -> Option<&'static Preset> {
        PRESETS.iter().find(|p| p.name == name)
    }

    /// Every route of the table: method, path pattern and class.
    pub fn routes(&self) -> impl Iterator<Item = (Method, &'static str, Class)> + '_ {
        self.routes.iter().flat_map(|route| {
            [
                (GET, Method::GET),
                (POST, Method::POST),
                (PUT, Method::PUT),
                (DELETE, Method::DELETE),
            ]
            .into_iter()
            .filter(|(bit, _)| route.0 & bit != 0)
            .map(|(_, method)| (method, route.1, route.2))
        })
    }

    /// How many routes (method and path) of each class the table has.
    pub fn counts(&self) -> (usize, usize) {
        let count = |class| self.routes().filter(|r| r.2 == class).count();
        (count(I), count(A))
    }
}

pub static PRESETS: [Preset; 3] = [VLLM, SGLANG, LLAMACPP];

/// vLLM's OpenAI-compatible server (`vllm serve`). vLLM's `--api-key` guards only paths under
/// `/v1`, `/v2`, `/inference` and `/cohere`; everything else, profiling, cache resets, sleep
/// and weight updates included, is open.
pub const VLLM: Preset = Preset {
    name: "vllm",
    source:
        "vLLM 0.33.0 (commit 4ba787ec9): vllm/entrypoints/**/api_router.py, serve/instrumentator",
    probe: "/health",
    routes: &[
        Route(POST, "/v1/chat/completions", I),
        Route(POST, "/v1/chat/completions/batch", I),
        Route(POST, "/v1/completions", I),
        Route(POST, "/v1/responses", I),
        Route(GET, "/v1/responses/*", I),
        Route(POST, "/v1/responses/*/cancel", I),
        Route(POST, "/v1/messages", I),
        Route(POST, "/v1/messages/count_tokens", I),
        Route(GET, "/v1/models", I),
        Route(POST, "/v1/embeddings", I),
        Route(POST, "/v1/score", I),
        Route(POST, "/v1/rerank", I),
        Route(POST, "/v2/rerank", I),
        Route(POST, "/v2/embed", I),
        Route(POST, "/score", I),
        Route(POST, "/rerank", I),
        Route(POST, "/pooling", I),
        Route(POST, "/classify", I),
        Route(POST, "/tokenize", I),
        Route(POST, "/detokenize", I),
        Route(GET, "/tokenizer_info", I),
        Route(POST, "/v1/audio/transcriptions", I),
        Route(POST, "/v1/audio/translations", I),
        Route(GET, "/v1/realtime", I),
        Route(POST, "/v1/decisions", I),
        Route(POST, "/v1/systemone", I),
        Route(POST, "/generative_scoring", I),
        Route(POST, "/cohere/v2/chat", I),
        Route(POST, "/invocations", I),
        Route(GET, "/metrics", A),
        Route(GET, "/load", A),
        Route(GET, "/version", A),
        Route(GET, "/kv_event_sources", A),
        Route(GET | POST, "/ping", A),
        Route(GET, "/docs", A),
        Route(GET, "/docs/oauth2-redirect", A),
        Route(GET, "/redoc", A),
        Route(GET, "/openapi.json", A),
        Route(POST, "/v1/load_lora_adapter", A),
        Route(POST, "/v1/unload_lora_adapter", A),
        Route(POST, "/start_profile", A),
        Route(POST, "/stop_profile", A),
        Route(POST, "/scale_elastic_ep", A),
        Route(POST, "/is_scaling_elastic_ep", A),
        Route(POST, "/fault_tolerance/apply", A),
        Route(GET, "/fault_tolerance/status", A),
        Route(POST, "/v1/chat/completions/render", A),
        Route(POST, "/v1/messages/render", A),
        Route(POST, "/v1/completions/render", A),
        Route(POST, "/v1/responses/render", A),
        Route(POST, "/v1/chat/completions/derender", A),
        Route(POST, "/v1/completions/derender", A),
        Route(POST, "/cohere/v2/chat/render", A),
        Route(POST, "/inference/v1/generate", A),
        Route(POST, "/inference/v1/abort_requests", A),
        Route(POST, "/abort_requests", A),
        Route(POST, "/reset_prefix_cache", A),
        Route(POST, "/reset_mm_cache", A),
        Route(POST, "/reset_encoder_cache", A),
        Route(POST, "/collective_rpc", A),
        Route(GET, "/server_info", A),
        Route(POST, "/sleep", A),
        Route(POST, "/release_kv_cache_memory", A),
        Route(POST, "/wake_up", A),
        Route(GET, "/is_sleeping", A),
        Route(POST, "/pause", A),
        Route(POST, "/resume", A),
        Route(GET, "/is_paused", A),
        Route(POST, "/init_weight_transfer_engine", A),
        Route(POST, "/shutdown_weight_transfer_engine", A),
        Route(POST, "/start_weight_update", A),
        Route(POST, "/start_draft_weight_update", A),
        Route(POST, "/update_weights", A),
        Route(POST, "/finish_weight_update", A),
        Route(POST, "/update_weight_version", A),
        Route(GET, "/weight_info", A),
        Route(POST, "/weight_checker", A),
        Route(GET, "/get_world_size", A),
    ],
};

/// SGLang's HTTP server (`python -m sglang.launch_server`). SGLang lets `/health*`, `/ready*`
/// and `/metrics*` through by prefix and marks its admin routes `ADMIN_OPTIONAL`: open to the
/// ordinary `--api-key` unless an `--admin-api-key` is set. The admin rows below are those
/// routes, plus server information and monitoring.
pub(crate) const SGLANG: Preset = Preset {
    name: "sglang",
    source:
        "SGLang 0.5.23: python/sglang/srt/entrypoints/http_server.py, v1_loads.py, elastic_ep.py",
    probe: "/health",
    routes: &[
        Route(POST | PUT, "/generate", I),
        Route(POST | PUT, "/encode", I),
        Route(POST | PUT, "/classify", I),
        Route(POST, "/v1/completions", I),
        Route(POST, "/v1/chat/completions", I),
        Route(POST, "/v1/embeddings", I),
        Route(POST, "/v1/classify", I),
        Route(POST, "/v1/tokenize", I),
        Route(POST, "/tokenize", I),
        Route(POST, "/v1/detokenize", I),
        Route(POST, "/detokenize", I),
        Route(POST, "/v1/audio/transcriptions", I),
        Route(GET, "/v1/realtime", I),
        Route(GET, "/v1/models", I),
        Route(GET, "/v1/models/**", I),
        Route(POST, "/v1/score", I),
        Route(POST, "/v1/decisions", I),
        Route(POST, "/v1/responses", I),
        Route(GET, "/v1/responses/*", I),
        Route(POST, "/v1/responses/*/cancel", I),
        Route(POST | PUT, "/v1/rerank", I),
        Route(POST, "/v1/messages", I),
        Route(POST, "/v1/messages/count_tokens", I),
        Route(POST, "/v1/systemone", I),
        Route(POST, "/invocations", I),
        Route(POST, "/api/chat", I),
        Route(POST, "/api/generate", I),
        Route(GET, "/api/tags", I),
        Route(POST, "/api/show", I),
        Route(POST, "/vertex_generate", I),
        Route(POST, "/parse_function_call", I),
        Route(POST, "/separate_reasoning", I),
        Route(GET | POST, "/open_session", I),
        Route(GET | POST, "/close_session", I),
        Route(GET, "/get_model_info", I),
        Route(GET, "/model_info", I),
        Route(GET, "/ready", A),
        Route(GET, "/health_generate", A),
        Route(GET, "/ping", A),
        Route(GET, "/metrics", A),
        Route(GET, "/v1/loads", A),
        Route(GET, "/get_server_info", A),
        Route(GET, "/server_info", A),
        Route(GET, "/get_hicache_l3_cache_layout", A),
        Route(GET, "/docs", A),
        Route(GET, "/docs/oauth2-redirect", A),
        Route(GET, "/redoc", A),
        Route(GET, "/openapi.json", A),
        Route(POST | PUT, "/set_internal_state", A),
        Route(POST, "/dumper/*", A),
        Route(GET | POST, "/flush_cache", A),
        Route(POST, "/add_external_corpus", A),
        Route(POST, "/remove_external_corpus", A),
        Route(GET, "/list_external_corpora", A),
        Route(POST, "/hicache/storage-backend/clear", A),
        Route(GET | PUT | DELETE, "/hicache/storage-backend", A),
        Route(GET | POST, "/start_profile", A),
        Route(GET | POST, "/stop_profile", A),
        Route(GET | POST, "/set_trace_level", A),
        Route(GET | POST, "/freeze_gc", A),
        Route(GET | POST, "/start_expert_distribution_record", A),
        Route(GET | POST, "/stop_expert_distribution_record", A),
        Route(GET | POST, "/dump_expert_distribution_record", A),
        Route(POST, "/update_weights_from_disk", A),
        Route(POST, "/init_weights_send_group_for_remote_instance", A),
        Route(POST, "/send_weights_to_remote_instance", A),
        Route(GET, "/get_remote_instance_transfer_engine_info", A),
        Route(GET, "/remote_instance_transfer_engine_info", A),
        Route(POST, "/init_weights_update_group", A),
        Route(POST, "/destroy_weights_update_group", A),
        Route(POST, "/update_weights_from_tensor", A),
        Route(POST, "/begin_weight_update", A),
        Route(POST, "/end_weight_update", A),
        Route(POST, "/update_weights_from_distributed", A),
        Route(POST, "/update_weights_from_ipc", A),
        Route(POST, "/update_weight_version", A),
        Route(GET | POST, "/get_weights_by_name", A),
        Route(GET | POST, "/release_memory_occupation", A),
        Route(GET | POST, "/resume_memory_occupation", A),
        Route(GET | POST, "/weights_checker", A),
        Route(GET | POST, "/slow_down", A),
        Route(POST, "/pd_role_switch", A),
        Route(POST, "/load_lora_adapter", A),
        Route(POST, "/load_lora_adapter_from_tensors", A),
        Route(POST, "/unload_lora_adapter", A),
        Route(GET | POST, "/configure_logging", A),
        Route(POST, "/abort_request", A),
        Route(POST, "/pause_generation", A),
        Route(POST, "/continue_generation", A),
        Route(POST, "/scale_elastic_ep", A),
        Route(GET, "/is_scaling_elastic_ep", A),
    ],
};

/// llama.cpp's `llama-server`. Its `--api-key` exempts only `/health`, `/v1/health` and the
/// web UI; the admin rows are what lets one client change or read the server for all:
/// server properties, LoRA adapters, the slots (other clients' prompts), router-mode model
/// loading, the MCP CORS proxy and server-side tools.
pub(crate) const LLAMACPP: Preset = Preset {
    name: "llamacpp",
    source: "llama.cpp commit 0c1e57098 (as vendored by llama-cpp-python 0.3.36): tools/server/server.cpp",
    probe: "/health",
    routes: &[
        Route(GET, "/v1/health", I),
        Route(GET, "/models", I),
        Route(GET, "/v1/models", I),
        Route(GET, "/props", I),
        Route(POST, "/completion", I),
        Route(POST, "/completions", I),
        Route(POST, "/v1/completions", I),
        Route(POST, "/chat/completions", I),
        Route(POST, "/v1/chat/completions", I),
        Route(POST, "/v1/chat/completions/control", I),
        Route(POST, "/v1/responses", I),
        Route(POST, "/responses", I),
        Route(POST, "/v1/audio/transcriptions", I),
        Route(POST, "/audio/transcriptions", I),
        Route(POST, "/v1/messages", I),
        Route(POST, "/v1/messages/count_tokens", I),
        Route(POST, "/infill", I),
        Route(POST, "/embedding", I),
        Route(POST, "/embeddings", I),
        Route(POST, "/v1/embeddings", I),
        Route(POST, "/rerank", I),
        Route(POST, "/reranking", I),
        Route(POST, "/v1/rerank", I),
        Route(POST, "/v1/reranking", I),
        Route(POST, "/tokenize", I),
        Route(POST, "/detokenize", I),
        Route(POST, "/apply-template", I),
        Route(POST, "/chat/completions/input_tokens", I),
        Route(POST, "/v1/chat/completions/input_tokens", I),
        Route(POST, "/responses/input_tokens", I),
        Route(POST, "/v1/responses/input_tokens", I),
        Route(GET | DELETE, "/v1/stream", I),
        Route(POST, "/v1/streams/lookup", I),
        Route(GET, "/metrics", A),
        Route(POST, "/props", A),
        Route(GET | POST, "/lora-adapters", A),
        Route(GET, "/slots", A),
        Route(POST, "/slots/*", A),
        Route(POST | DELETE, "/models", A),
        Route(POST, "/models/load", A),
        Route(POST, "/models/unload", A),
        Route(GET, "/models/sse", A),
        Route(GET | POST, "/cors-proxy", A),
        Route(GET | POST, "/tools", A),
    ],
};

/// Which methods of a path each class may use.
#[derive(Debug, Default, Clone, Copy)]
struct Methods {
    inference: u8,
    admin: u8,
}

impl Methods {
    fn add(&mut self, route: &Route) {
        match route.2 {
            Class::Inference => self.inference |= route.0,
            Class::Admin => self.admin |= route.0,
        }
    }

    fn class(self, bit: u8) -> Option<Class> {
        if self.inference & bit != 0 {
            Some(Class::Inference)
        } else if self.admin & bit != 0 {
            Some(Class::Admin)
        } else {
            None
        }
    }
}

/// A preset indexed for lookups, built once at start-up.
#[derive(Debug)]
pub struct Table {
    exact: HashMap<&'static str, Methods>,
    /// Patterns with `*` segments, in table order.
    patterns: Vec<(&'static str, Methods)>,
}

impl Table {
    pub fn new(preset: &Preset) -> Self {
        let mut exact: HashMap<&'static str, Methods> = HashMap::new();
        let mut patterns: Vec<(&'static str, Methods)> = Vec::new();
        for route in preset.routes {
            if route.1.contains('*') {
                match patterns.iter_mut().find(|(p, _)| *p == route.1) {
                    Some((_, methods)) => methods.add(route),
                    None => {
                        let mut methods = Methods::default();
                        methods.add(route);
                        patterns.push((route.1, methods));
                    }
                }
            } else {
                exact.entry(route.1).or_default().add(route);
            }
        }
        Self { exact, patterns }
    }

    /// The class of `method` on `path`, or `None` when the table does not have it. A path
    /// that is not plain (see [`plain_path`]) is never in the table.
    pub fn class(&self, method: &Method, path: &str) -> Option<Class> {
        let bit = method_bit(method);
        if bit == 0 || !plain_path(path) {
            return None;
        }
        if let Some(methods) = self.exact.get(path) {
            return methods.class(bit);
        }
        self.patterns
            .iter()
            .find(|(pattern, _)| matches(pattern, path))
            .and_then(|(_, methods)| methods.class(bit))
    }
}

/// Whether `path` fits `pattern`, segment by segment: `*` takes one segment, a final `**`
/// one or more, anything else must be equal.
fn matches(pattern: &str, path: &str) -> bool {
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some("**"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(w), Some(h)) if w == h => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(preset: &Preset, method: Method, path: &str) -> Option<Class> {
        Table::new(preset).class(&method, path)
    }

    #[test]
    fn every_preset_has_inference_and_admin_routes_and_no_duplicate_rows() {
        for preset in &PRESETS {
            let (inference, admin) = preset.counts();
            assert!(inference > 10 && admin > 5, "{}", preset.name);
            for (i, a) in preset.routes.iter().enumerate() {
                assert!(a.1.starts_with('/') && a.0 != 0, "{}", a.1);
                let clash = preset.routes[i + 1..]
                    .iter()
                    .any(|b| b.1 == a.1 && b.0 & a.0 != 0);
                assert!(!clash, "{} {} is listed twice", preset.name, a.1);
            }
        }
    }

    #[test]
    fn routes_are_found_by_method_and_exact_path() {
        assert_eq!(
            class(&VLLM, Method::POST, "/v1/chat/completions"),
            Some(Class::Inference)
        );
        assert_eq!(class(&VLLM, Method::GET, "/v1/chat/completions"), None);
        assert_eq!(
            class(&VLLM, Method::POST, "/start_profile"),
            Some(Class::Admin)
        );
        assert_eq!(class(&VLLM, Method::POST, "/start_profile/"), None);
        assert_eq!(class(&VLLM, Method::GET, "/v1/nonexistent"), None);
        assert_eq!(
            class(&LLAMACPP, Method::GET, "/props"),
            Some(Class::Inference)
        );
        assert_eq!(class(&LLAMACPP, Method::POST, "/props"), Some(Class::Admin));
        assert_eq!(class(&SGLANG, Method::PATCH, "/generate"), None);
    }

    #[test]
    fn star_takes_one_segment_and_double_star_the_rest() {
        assert_eq!(
            class(&VLLM, Method::GET, "/v1/responses/resp_123"),
            Some(Class::Inference)
        );
        assert_eq!(
            class(&VLLM, Method::POST, "/v1/responses/resp_123/cancel"),
            Some(Class::Inference)
        );
        assert_eq!(class(&VLLM, Method::GET, "/v1/responses/a/b"), None);
        assert_eq!(class(&VLLM, Method::GET, "/v1/responses/"), None);
        assert_eq!(
            class(&SGLANG, Method::GET, "/v1/models/Qwen/Qwen2.5-7B"),
            Some(Class::Inference)
        );
        assert_eq!(class(&SGLANG, Method::GET, "/v1/models/"), None);
        assert_eq!(
            class(&LLAMACPP, Method::POST, "/slots/0"),
            Some(Class::Admin)
        );
    }

    #[test]
    fn paths_that_are_not_plain_are_never_in_the_table() {
        for path in [
            "/v1/responses/..",
            "/v1/responses/../cancel",
            "/v1/responses/%2e%2e/cancel",
            "/v1/models/..%2Fstart_profile",
            "//v1/models",
            "/v1//models",
            "/v1/./models",
            "/v1\\models",
            "/v1/models%5c",
        ] {
            assert!(!plain_path(path), "{path}");
            assert_eq!(class(&SGLANG, Method::GET, path), None, "{path}");
        }
        for path in ["/", "/v1/models", "/v1/models/a%20b", "/v1/models/x.y"] {
            assert!(plain_path(path), "{path}");
        }
    }

    /// docs/presets.md lists every route of every table with its methods and class. Each
    /// table must hold exactly those rows, so that neither can change without the other.
    #[test]
    fn every_table_holds_the_routes_docs_presets_md_lists() {
        let doc = include_str!("../docs/presets.md");
        let mut listed: Vec<(&str, String, &str, bool)> = Vec::new();
        let mut preset = None;
        for line in doc.lines() {
            if let Some(rest) = line.split("(`preset = \"").nth(1) {
                preset = rest.split('"').next();
            }
            let admin = if line.starts_with("- **Inference**: ") {
                false
            } else if line.starts_with("- **Admin**: ") {
                true
            } else {
                continue;
            };
            let preset = preset.expect("a route list follows its preset's heading");
            for route in line.split('`').skip(1).step_by(2) {
                let (methods, path) = route.split_once(' ').expect("METHODS /path");
                for method in methods.split('|') {
                    listed.push((preset, method.to_owned(), path, admin));
                }
            }
        }
        assert!(listed.iter().all(|row| Preset::named(row.0).is_some()));
        for preset in &PRESETS {
            let mut documented: Vec<(String, &str, bool)> = listed
                .iter()
                .filter(|row| row.0 == preset.name)
                .map(|row| (row.1.clone(), row.2, row.3))
                .collect();
            let mut held: Vec<(String, &str, bool)> = preset
                .routes()
                .map(|(method, path, class)| (method.to_string(), path, class == Class::Admin))
                .collect();
            documented.sort();
            held.sort();
            assert_eq!(held, documented, "{}", preset.name);
        }
    }
}
