//! `[upstream]`: the URL, its timeouts, its trusted roots, the server preset and SSE keep-alive.

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
    })
}
