//! Path normalisation and whole-segment route matching (`keylimit_sidecar::http::path`): the limiter
//! sees, and the app receives, one normal form per RFC 3986 equivalence class, so no spelling
//! of a limited path escapes its route.
//!
//! Input: one flags byte (bit 0: case-sensitive, bit 1: reject `;` parameters, bit 2:
//! lower-case hex when re-escaping), then the path, then optionally `\n` and a route prefix.
#![no_main]

use std::borrow::Cow;

use http::uri::PathAndQuery;
use keylimit_dataplane::{MatrixParameters, PathMatching};
use keylimit_sidecar::http::path::{match_form, normalize, PathError, SegmentPrefix};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let rules = PathMatching {
        case_sensitive: flags & 1 != 0,
        matrix_parameters: if flags & 2 != 0 {
            MatrixParameters::Reject
        } else {
            MatrixParameters::Ignore
        },
    };
    let text = String::from_utf8_lossy(rest);
    let (path, prefix) = match text.split_once('\n') {
        Some((p, q)) => (p, Some(q)),
        None => (&*text, None),
    };

    let normal = normalize(path);
    if path.starts_with('/') {
        assert_ne!(normal, Err(PathError::NotOriginForm), "{path:?}");
    } else {
        assert_eq!(normal, Err(PathError::NotOriginForm), "{path:?}");
    }

    // RFC 3986 §6.2.2.2: escaping an unreserved character spells the same URI, so it must
    // neither change the normal form nor turn a refused path into an accepted one.
    let escaped = escape_unreserved(path, flags & 4 != 0);
    assert_eq!(
        normalize(&escaped).map(Cow::into_owned),
        normal.clone().map(Cow::into_owned),
        "{path:?} and {escaped:?} are the same URI"
    );

    let Ok(out) = normal else { return };
    check_normal_form(path, &out);

    // The rewritten request target is built from the normal form: a path the http crate
    // accepted must stay one it accepts (proxy.rs relies on that).
    if let Ok(pq) = PathAndQuery::try_from(path) {
        if pq.path() == path && pq.query().is_none() {
            let again = PathAndQuery::try_from(&*out);
            assert!(
                again.as_ref().is_ok_and(|pq| pq.path() == &*out),
                "{path:?} -> {out:?} is not a valid request path"
            );
        }
    }

    let form = match match_form(&out, &rules) {
        Ok(f) => {
            assert_eq!(
                match_form(&f, &rules).as_deref(),
                Ok(&*f),
                "match_form({f:?})"
            );
            assert!(!f.contains(';'), "{f:?}");
            // Dropping parameters must not leave an empty segment: `/;/admin` compared as
            // `//admin` would escape a route on `/admin` that the app serves it from.
            assert!(!f.contains("//"), "{path:?} -> {out:?} -> {f:?}");
            if !rules.case_sensitive {
                assert!(!f.bytes().any(|b| b.is_ascii_uppercase()), "{f:?}");
            }
            Some(f)
        }
        Err(e) => {
            assert_eq!(e, PathError::MatrixParameters);
            assert!(out.contains(';') && rules.matrix_parameters == MatrixParameters::Reject);
            None
        }
    };

    // A route declared with this very path covers it (a prefix's own parameters are
    // ignored, never refused), and the root route covers every path.
    let own = SegmentPrefix::compile(path, &rules).expect("a normalisable path compiles");
    let root = SegmentPrefix::compile("/", &rules).expect("/ compiles");
    if let Some(f) = &form {
        assert!(
            own.matches(f),
            "prefix {path:?} does not match its own form {f:?}"
        );
        assert!(root.matches(f), "/ does not match {f:?}");
    }

    if let (Some(prefix), Some(f)) = (prefix, &form) {
        if let Ok(p) = SegmentPrefix::compile(prefix, &rules) {
            if p.matches(f) {
                // Matching is on whole segments: the rest after the prefix is empty or a
                // new segment.
                assert!(f.len() >= p.len());
                let rest = &f[p.len()..];
                assert!(
                    rest.is_empty() || rest.starts_with('/'),
                    "{prefix:?} / {f:?}"
                );
            }
        }
    }
});

fn check_normal_form(input: &str, out: &str) {
    assert!(out.starts_with('/'), "{input:?} -> {out:?}");
    let again = normalize(out);
    assert_eq!(
        again.as_deref(),
        Ok(out),
        "not idempotent: {input:?} -> {out:?}"
    );
    // The allocation-free fast path covers every normal form without an escape; one with an
    // escape (`/caf%C3%A9`) is re-checked the slow way and comes back equal but owned.
    if !out.contains('%') {
        assert!(
            matches!(again, Ok(Cow::Borrowed(_))),
            "{input:?} -> {out:?} is not recognised as normal"
        );
    }
    assert!(!out.contains("//"), "{input:?} -> {out:?}");
    assert!(!out.contains('\\'), "{input:?} -> {out:?}");
    for seg in out.split('/') {
        let bare = seg.split(';').next().unwrap_or(seg);
        assert!(bare != "." && bare != "..", "{input:?} -> {out:?}");
    }
    let b = out.as_bytes();
    for (i, _) in b.iter().enumerate().filter(|(_, &c)| c == b'%') {
        let hex = b.get(i + 1..i + 3);
        let hex = hex.filter(|h| h.iter().all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F')));
        let Some(hex) = hex else {
            panic!("{input:?} -> {out:?}: '%' not followed by two upper-case hex digits");
        };
        let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16);
        let v = v.unwrap_or_else(|_| panic!("{input:?} -> {out:?}: bad escape"));
        assert!(
            !is_unreserved(v),
            "{input:?} -> {out:?}: escaped unreserved {v:#x}"
        );
        assert!(!matches!(v, 0 | b'/' | b'\\'), "{input:?} -> {out:?}");
    }
    let upper = out.to_ascii_uppercase();
    for bad in ["%2F", "%5C", "%00"] {
        assert!(!upper.contains(bad), "{input:?} -> {out:?} contains {bad}");
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// `path` with every unreserved character after the leading '/' percent-escaped, except the
/// two hex digits of an existing escape (escaping those would change what the escape means).
fn escape_unreserved(path: &str, lower: bool) -> String {
    let digits: &[u8; 16] = if lower {
        b"0123456789abcdef"
    } else {
        b"0123456789ABCDEF"
    };
    let mut out = String::with_capacity(path.len() * 3);
    let mut in_escape = 0;
    for (i, c) in path.char_indices() {
        if in_escape > 0 {
            in_escape -= 1;
            out.push(c);
        } else if c == '%' {
            in_escape = 2;
            out.push(c);
        } else if i > 0 && c.is_ascii() && is_unreserved(c as u8) {
            let b = c as u8;
            out.push('%');
            out.push(char::from(digits[usize::from(b >> 4)]));
            out.push(char::from(digits[usize::from(b & 15)]));
        } else {
            out.push(c);
        }
    }
    out
}
