//! Request paths that every server reads the same way. Used wherever keygate compares a
//! path with a route: the preset tables, a key's `allow` rules, and the config that writes
//! them.

/// A path that every server reads the same way: no empty, `.` or `..` segment, no backslash,
/// and no percent-encoded `.`, `/` or `\`. Paths that are not plain could mean one route to
/// keygate and another to a server that normalises them, so they never match a preset route
/// or a key's `path_prefix`.
pub(crate) fn plain_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    if path.contains('\\') {
        return false;
    }
    let lower = |i: usize| path.as_bytes().get(i).map(u8::to_ascii_lowercase);
    let encoded_separator = path.bytes().enumerate().any(|(i, b)| {
        b == b'%'
            && matches!(
                (lower(i + 1), lower(i + 2)),
                (Some(b'2'), Some(b'e' | b'f')) | (Some(b'5'), Some(b'c'))
            )
    });
    !encoded_separator
        && rest
            .split('/')
            .all(|segment| !matches!(segment, "" | "." | ".."))
}
