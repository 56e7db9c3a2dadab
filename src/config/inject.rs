//! `[[inject]]`: header names and the `${VAR}` templates of injected values.

use super::*;

pub(super) fn header_name(
    h: &Spanned<String>,
    key: &str,
    p: &mut Problems<'_>,
) -> Option<HeaderName> {
    match HeaderName::from_bytes(h.get_ref().to_ascii_lowercase().as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            p.at(
                h.span(),
                key,
                "is not a valid header name; use letters, digits and -",
            );
            None
        }
    }
}

pub(super) fn inject(
    entries: &[Spanned<InjectFile>],
    secrets: &dyn SecretSource,
    p: &mut Problems<'_>,
) -> Vec<Injected> {
    let mut out: Vec<Injected> = Vec::new();
    for entry in entries {
        let i = entry.get_ref();
        let key = format!("[[inject]] (name = \"{}\")", i.name);
        let Ok(name) = HeaderName::from_bytes(i.name.to_ascii_lowercase().as_bytes()) else {
            p.at(
                entry.span(),
                &key,
                "name is not a valid header name; use letters, digits and -",
            );
            continue;
        };
        let reserved = HOP_BY_HOP
            .iter()
            .chain(&REQUEST_REPLACED)
            .chain(&FORWARDING)
            .chain([&X_REQUEST_ID, &http::header::CONTENT_LENGTH])
            .any(|r| *r == name);
        if reserved {
            p.at(
                entry.span(),
                &key,
                "keygate manages this header itself and cannot inject it; pick another name",
            );
            continue;
        }
        if out.iter().any(|o| o.name == name) {
            p.at(
                entry.span(),
                &key,
                "this header is injected twice; keep one entry",
            );
            continue;
        }
        let value_key = format!("{key} value");
        let value = match expand(i.value.get_ref(), secrets) {
            Ok(v) => v,
            Err(why) => {
                p.at(i.value.span(), &value_key, why);
                continue;
            }
        };
        match HeaderValue::from_str(value.expose()) {
            Ok(mut v) => {
                v.set_sensitive(true);
                out.push(Injected { name, value: v });
            }
            Err(_) => p.at(
                i.value.span(),
                &value_key,
                "contains characters not allowed in a header (after ${...} expansion), such as a newline",
            ),
        }
    }
    out
}

/// Expands `${NAME}` from the environment and `$$` to a literal `$`. Any other `$` is an
/// error: `$NAME` without braces looks like a variable but would reach the origin as written.
pub(super) fn expand(template: &str, secrets: &dyn SecretSource) -> Result<Secret, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let Some(after) = after.strip_prefix('{') else {
            return Err(unbraced(after));
        };
        let end = after.find('}').ok_or_else(|| {
            "has a \"${\" without a closing \"}\"; write ${NAME}, or $$ for a literal $".to_owned()
        })?;
        let var = &after[..end];
        let valid = !var.is_empty()
            && !var.starts_with(|c: char| c.is_ascii_digit())
            && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(format!(
                "\"${{{var}}}\" is not an environment variable name; use letters, digits and _"
            ));
        }
        match secrets.env(var) {
            Some(v) if !v.expose().is_empty() => out.push_str(v.expose()),
            _ => {
                return Err(format!(
                "uses ${{{var}}}, but the environment variable {var} is not set or empty; set it"
            ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Secret::new(out))
}

/// The problem with a `$` followed by neither `{` nor `$`; `after` is the text after it. The
/// name is repeated only when it looks like an environment variable (capitals, digits, `_`),
/// so a literal value that happens to hold a `$` is not echoed into the log.
pub(super) fn unbraced(after: &str) -> String {
    let end = after
        .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(after.len());
    let name = &after[..end];
    if name.starts_with(|c: char| c.is_ascii_uppercase() || c == '_') {
        format!("has ${name} without braces, which would be sent as written; write ${{{name}}} to insert the environment variable {name}, or $${name} for a literal $")
    } else {
        "has a $ that starts no ${NAME}; write ${NAME} to insert an environment variable, or $$ for a literal $".to_owned()
    }
}
