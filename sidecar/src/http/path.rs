//! Request paths as route matching and the app must see them.
//!
//! RFC 3986 makes `/a/%62`, `/a/./b`, `/a/x/../b` and `/a/b` the same URI, and most apps also
//! treat `/a//b` like `/a/b`. If route matching compared raw bytes, every such spelling of a
//! limited path would escape its limits. So the sidecar normalises the path once (section 6:
//! unreserved escapes decoded, hex digits upper-cased, dot segments removed; plus merged
//! slashes), matches routes on whole segments of that form, and forwards that same form, so
//! the app never sees a spelling the limiter did not. Spellings whose meaning depends on the
//! app (an escaped `/` or `\`, a NUL, a dot segment with parameters such as Tomcat's `..;`)
//! cannot be normalised safely and are refused with 400.

use std::borrow::Cow;

use keylimit_dataplane::{MatrixParameters, PathMatching};

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F`, `%5C` or a raw `\`: apps disagree on whether they separate segments.
    EncodedSeparator,
    /// `%00`: a C string ends there, the rest of the path would be invisible to the app.
    Nul,
    /// A `.` or `..` segment with `;` parameters: some servers treat `..;` as `..`.
    DotSegmentParameters,
    /// The policy refuses `;` parameters (`pathMatching.matrixParameters: Reject`).
    MatrixParameters,
    /// Not an origin-form path (does not start with `/`).
    NotOriginForm,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::BadEscape => "the path has a malformed percent-escape",
            PathError::EncodedSeparator => "the path has an escaped '/' or a backslash",
            PathError::Nul => "the path has an escaped NUL",
            PathError::DotSegmentParameters => "the path has a dot segment with parameters",
            PathError::MatrixParameters => "this API does not accept ';' parameters in paths",
            PathError::NotOriginForm => "the request target must be a path starting with '/'",
        }
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// True when the path certainly is in normal form already, checked in one pass without
/// allocating: the common case on the request path.
fn already_normal(path: &[u8]) -> bool {
    let mut prev_slash = false;
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'%' => {
                // Already normal only if the escape is upper-case hex of a byte that must stay
                // escaped; anything else is decoded, refused or re-cased by the slow path.
                let hex = |b: u8| matches!(b, b'0'..=b'9' | b'A'..=b'F');
                let (Some(&hi), Some(&lo)) = (path.get(i + 1), path.get(i + 2)) else {
                    return false;
                };
                if !hex(hi) || !hex(lo) {
                    return false;
                }
                let v = hex_val(hi).unwrap_or(0) << 4 | hex_val(lo).unwrap_or(0);
                if v == 0 || v == b'/' || v == b'\\' || is_unreserved(v) {
                    return false;
                }
                prev_slash = false;
                i += 3;
                continue;
            }
            b'\\' => return false,
            // A segment that is only parameters (`/;x/`) is empty once they are dropped for
            // matching: the slow path removes it, like any empty segment.
            b';' if prev_slash => return false,
            b'/' => {
                if prev_slash {
                    return false;
                }
                prev_slash = true;
            }
            b'.' if prev_slash => {
                // `/.` starts a dot segment only when the segment is `.` or `..` (optionally
                // with parameters); `/.well-known` is fine.
                let rest = &path[i..];
                let seg_end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
                let seg = &rest[..seg_end];
                let bare = seg.split(|&b| b == b';').next().unwrap_or(seg);
                if bare == b"." || bare == b".." {
                    return false;
                }
                prev_slash = false;
            }
            _ => prev_slash = false,
        }
        i += 1;
    }
    true
}

/// Decodes unreserved escapes and upper-cases the hex of the others (RFC 3986 §6.2.2.1-2).
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex_val),
                    b.get(i + 2).copied().and_then(hex_val),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let v = hi << 4 | lo;
                match v {
                    0 => return Err(PathError::Nul),
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    _ if is_unreserved(v) => out.push(char::from(v)),
                    _ => {
                        out.push('%');
                        out.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
                        out.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::EncodedSeparator),
            _ => {
                // The http crate only admits visible ASCII in a path, so a byte is a char;
                // anything else is passed through unchanged rather than guessed at.
                let start = i;
                while i < b.len() && b[i] != b'%' && b[i] != b'\\' {
                    i += 1;
                }
                out.push_str(&path[start..i]);
                continue;
            }
        }
    }
    Ok(out)
}

/// The normal form of an origin-form path: what route matching sees and the app receives.
/// Borrowed (no allocation) when the path is already normal.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if already_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    // Remove dot segments (RFC 3986 §5.2.4) and empty segments (merged slashes). A trailing
    // slash, or a path ending in a dot segment, keeps its final '/'.
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded[1..].split('/') {
        let bare = seg.split(';').next().unwrap_or(seg);
        match bare {
            "." | ".." if bare.len() != seg.len() => return Err(PathError::DotSegmentParameters),
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            "" => trailing_slash = true,
            _ => {
                segments.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// The form a normalised path is compared in: parameters dropped from each segment (unless
/// the policy refuses them) and ASCII-lower-cased unless matching is case-sensitive.
pub fn match_form<'p>(normal: &'p str, rules: &PathMatching) -> Result<Cow<'p, str>, PathError> {
    let has_params = normal.contains(';');
    if has_params && rules.matrix_parameters == MatrixParameters::Reject {
        return Err(PathError::MatrixParameters);
    }
    let needs_lower = !rules.case_sensitive && normal.bytes().any(|b| b.is_ascii_uppercase());
    if !has_params && !needs_lower {
        return Ok(Cow::Borrowed(normal));
    }
    let mut out = String::with_capacity(normal.len());
    if has_params {
        let mut first = true;
        for seg in normal.split('/') {
            if !first {
                out.push('/');
            }
            first = false;
            out.push_str(seg.split(';').next().unwrap_or(seg));
        }
    } else {
        out.push_str(normal);
    }
    if !rules.case_sensitive {
        out.make_ascii_lowercase();
    }
    Ok(Cow::Owned(out))
}

/// A route prefix compiled for whole-segment matching: normalised like a request path, in
/// match form, without its trailing slash (so `/a` and `/a/` both mean "`/a` and below").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentPrefix(String);

impl SegmentPrefix {
    pub fn compile(prefix: &str, rules: &PathMatching) -> Result<Self, PathError> {
        let normal = normalize(prefix)?;
        // A prefix is the operator's own text: its parameters are ignored, never refused.
        let lenient = PathMatching {
            matrix_parameters: MatrixParameters::Ignore,
            ..rules.clone()
        };
        let form = match_form(&normal, &lenient)?;
        Ok(SegmentPrefix(form.trim_end_matches('/').to_string()))
    }

    /// Length in bytes: longer prefixes are more specific.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `path` (in match form) is the prefix itself or lies below it.
    pub fn matches(&self, path: &str) -> bool {
        match path.strip_prefix(self.0.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/a",
            "/a/b/",
            "/.well-known/x",
            "/a.b/c..d",
            "/a;v=1/b",
        ] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn rfc3986_equivalents_normalise_to_one_form() {
        for p in [
            "/admin/users",
            "/admin/%75sers",
            "/%61dmin/users",
            "/admin/./users",
            "/admin/x/../users",
            "//admin//users",
            "/admin/%2e/users",
            "/admin/x/%2E%2E/users",
            "/./admin/users",
            "/../admin/users",
            "/admin/users/.",
        ] {
            let got = n(p).unwrap();
            assert!(
                got == "/admin/users" || got == "/admin/users/",
                "{p} -> {got}"
            );
        }
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/..").unwrap(), "/");
        assert_eq!(n("/..").unwrap(), "/");
        assert_eq!(n("/a/%7e%2d").unwrap(), "/a/~-");
        // Found by the path_normalize fuzz target: a parameters-only segment used to pass the
        // fast path, and its match form `//admin/users` escaped a `/admin` route.
        assert_eq!(n("/;/admin/users").unwrap(), "/admin/users");
        assert_eq!(n("/;x=1/admin").unwrap(), "/admin");
        assert_eq!(n("/a/;").unwrap(), "/a/");
    }

    #[test]
    fn normal_forms_with_escapes_are_borrowed() {
        for p in ["/caf%C3%A9", "/a%20b/%3F"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        for p in ["/caf%c3%a9", "/%41", "/%2F", "/%00", "/%5C", "/%G0", "/%4"] {
            assert!(!already_normal(p.as_bytes()), "{p}");
        }
    }

    #[test]
    fn reserved_escapes_stay_escaped_with_upper_hex() {
        assert_eq!(n("/a%20b/%3f").unwrap(), "/a%20b/%3F");
        assert_eq!(n("/caf%c3%a9").unwrap(), "/caf%C3%A9");
    }

    #[test]
    fn unsafe_spellings_are_refused() {
        assert_eq!(n("/a%2Fb"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%2fb"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%5Cb"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a\\b"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%00"), Err(PathError::Nul));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%4"), Err(PathError::BadEscape));
        assert_eq!(n("/a/..;/b"), Err(PathError::DotSegmentParameters));
        assert_eq!(n("/a/.;x=1/b"), Err(PathError::DotSegmentParameters));
        assert_eq!(n("*"), Err(PathError::NotOriginForm));
    }

    #[test]
    fn prefixes_match_whole_segments_case_insensitively_by_default() {
        let rules = PathMatching::default();
        let p = SegmentPrefix::compile("/x", &rules).unwrap();
        let m = |path: &str| {
            let normal = normalize(path).unwrap();
            p.matches(&match_form(&normal, &rules).unwrap())
        };
        assert!(m("/x"));
        assert!(m("/x/"));
        assert!(m("/x/y"));
        assert!(m("/X/y"));
        assert!(m("/x;jsessionid=1/y"));
        assert!(!m("/xy"));
        assert!(!m("/"));
        let root = SegmentPrefix::compile("/", &rules).unwrap();
        assert!(root.matches("/anything"));
        let slash = SegmentPrefix::compile("/x/", &rules).unwrap();
        assert_eq!(slash, p);
    }

    #[test]
    fn case_sensitive_and_reject_parameters_when_the_policy_says_so() {
        let rules = PathMatching {
            case_sensitive: true,
            matrix_parameters: MatrixParameters::Reject,
        };
        let p = SegmentPrefix::compile("/Admin", &rules).unwrap();
        assert!(p.matches(&match_form("/Admin/x", &rules).unwrap()));
        assert!(!p.matches(&match_form("/admin/x", &rules).unwrap()));
        assert_eq!(
            match_form("/Admin;a=1", &rules),
            Err(PathError::MatrixParameters)
        );
    }
}
