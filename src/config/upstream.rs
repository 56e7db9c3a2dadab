//! `[upstream]`: the URL, its timeouts, its trusted roots, the server preset, SSE keep-alive
//! and the fair queue in front of it (`max_in_flight`, `queue_timeout`).

use super::*;

pub(super) fn upstream(u: UpstreamFile, p: &mut Problems<'_>) -> Option<Upstream> {
    let connect_timeout = positive(&u.connect_timeout, "[upstream] connect_timeout", p);
    let response_timeout = positive(&u.response_timeout, "[upstream] response_timeout", p);
    let idle_timeout = positive(&u.idle_timeout, "[upstream] idle_timeout", p);
    let sse_keepalive = u.sse_keepalive.as_ref().map(|k| {
        let every = positive(k, "[upstream] sse_keepalive", p);
        if every >= idle_timeout {
            p.at(
                k.span(),
                "[upstream] sse_keepalive",
                "must be shorter than idle_timeout, which ends a stream whose upstream is silent that long whatever keygate sends; e.g. \"15s\", or raise idle_timeout",
            );
        }
        every
    });
    let max_in_flight = u.max_in_flight.as_ref().and_then(|n| {
        let value = usize::try_from(*n.get_ref()).ok().filter(|&v| v >= 1);
        if value.is_none() {
            p.at(
                n.span(),
                "[upstream] max_in_flight",
                "must be at least 1, e.g. the upstream's generation slots (vLLM --max-num-seqs, llama.cpp -np); leave it out for no limit",
            );
        }
        value
    });
    let queue_timeout = positive(&u.queue_timeout, "[upstream] queue_timeout", p);
    let preset = u.preset.as_ref().and_then(|name| {
        let found = Preset::named(name.get_ref());
        if found.is_none() && name.get_ref() != "none" {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            p.at(
                name.span(),
                "[upstream] preset",
                format!(
                    "is not a preset; write one of \"{}\" or \"none\"",
                    names.join("\", \"")
                ),
            );
        }
        found
    });
    let key = "[upstream] url";
    let uri = match u.url.get_ref().parse::<Uri>() {
        Ok(uri) => uri,
        Err(e) => {
            p.at(
                u.url.span(),
                key,
                format!("is not a URL ({e}); write e.g. \"http://127.0.0.1:8000\""),
            );
            return None;
        }
    };
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        p.at(
            u.url.span(),
            key,
            "needs a scheme and host, e.g. \"http://127.0.0.1:8000\"",
        );
        return None;
    };
    if *scheme != Scheme::HTTP && *scheme != Scheme::HTTPS {
        p.at(u.url.span(), key, "must start with http:// or https://");
        return None;
    }
    let ca_file = u.ca_file.as_ref().map(|f| PathBuf::from(f.get_ref()));
    let tls = *scheme == Scheme::HTTPS;
    let ca_certificates = if tls {
        let read = u
            .ca_file
            .as_ref()
            .map(|f| (f, tls_files::ca_certificates(Path::new(f.get_ref()))));
        match read {
            Some((_, Ok(certs))) => Some(certs),
            Some((f, Err(why))) => {
                p.at(f.span(), "[upstream] ca_file", why);
                None
            }
            None => None,
        }
    } else {
        if let Some(f) = &u.ca_file {
            p.at(
                f.span(),
                "[upstream] ca_file",
                "applies to https:// upstreams only; remove it or make the url https://",
            );
        }
        None
    };
    if uri.query().is_some() || authority.as_str().contains('@') {
        p.at(u.url.span(), key, "must not carry a query or user info; give scheme, host, port and an optional path prefix");
        return None;
    }
    Some(Upstream {
        scheme: scheme.clone(),
        authority: authority.clone(),
        path_prefix: uri.path().trim_end_matches('/').to_owned(),
        connect_timeout,
        response_timeout,
        idle_timeout,
        tls,
        ca_certificates,
        ca_file,
        preset,
        sse_keepalive,
        max_in_flight,
        queue_timeout,
    })
}

/// A key's `weight`, its share of the upstream under `max_in_flight`: 1 when left out.
pub(super) fn key_weight(weight: Option<i64>, problem: &mut dyn FnMut(String)) -> u32 {
    match weight.map(u32::try_from) {
        None => 1,
        Some(Ok(w)) if (1..=MAX_WEIGHT).contains(&w) => w,
        Some(_) => {
            problem(format!("weight must be a whole number from 1 to {MAX_WEIGHT}, e.g. weight = 4 for four times the default share of the upstream"));
            1
        }
    }
}
