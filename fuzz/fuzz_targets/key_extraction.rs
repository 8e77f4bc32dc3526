//! Where the sidecar finds the API key (`proxy::find_key`) and how it cuts the key out of
//! the query before forwarding (`proxy::cut_query_param`). Both are checked against an
//! independent model: a copy the sidecar did not read must make the request ambiguous, and
//! a stripped query must carry no copy of the key while every other byte stays as sent.
#![no_main]

use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::{Request, Uri};
use keylimit_sidecar::config::{hash_presented, KeySourceRule};
use keylimit_sidecar::http::proxy::{cut_query_param, find_key};
use libfuzzer_sys::fuzz_target;

/// Header names a request may carry: the rule's key header is either of the first two, so a
/// policy that reads the key from `Authorization` itself is covered as well.
const NAMES: [&str; 3] = ["x-api-key", "authorization", "x-other"];

// Input, as text so seeds stay readable (header values cannot hold a newline anyway):
// a flags byte (bit 0: read a key header, bit 1: that header is `authorization` rather than
// `x-api-key`, bit 2: bearer, bit 3: query parameter), then lines: the query parameter's
// name, the raw query, then one header per line, its first byte naming it (`k`: x-api-key,
// `a`: authorization, anything else: x-other) and the rest its raw value.
fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut lines = rest.split(|&b| b == b'\n');
    let param = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let raw_query = lines.next().unwrap_or_default();
    let rule = KeySourceRule {
        header: (flags & 1 != 0)
            .then(|| HeaderName::from_static(NAMES[usize::from(flags & 2 != 0)])),
        bearer: flags & 4 != 0,
        query_param: (flags & 8 != 0).then_some(param),
        strip: true,
        identity_header: HeaderName::from_static("x-keylimit-key"),
    };

    let query = String::from_utf8_lossy(raw_query).into_owned();
    let mut builder = Request::builder();
    let mut sent: Vec<(&str, Vec<u8>)> = Vec::new();
    for line in lines {
        let Some((&which, value)) = line.split_first() else {
            continue;
        };
        let name = match which {
            b'k' => NAMES[0],
            b'a' => NAMES[1],
            _ => NAMES[2],
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            builder = builder.header(name, v);
            sent.push((name, value.to_vec()));
        }
    }
    let uri = Uri::try_from(format!("/p?{query}"))
        .ok()
        .filter(|u| u.query() == Some(query.as_str()));
    let sent_query = uri.as_ref().and(Some(query.as_str()));
    let Ok(req) = builder
        .uri(uri.unwrap_or_else(|| Uri::from_static("/p")))
        .body(())
    else {
        return;
    };

    // The model: every copy of the key each configured source presents.
    let mut sources: Vec<Vec<Vec<u8>>> = Vec::new();
    if let Some(h) = &rule.header {
        sources.push(
            sent.iter()
                .filter(|(n, v)| *n == h.as_str() && !v.is_empty())
                .map(|(_, v)| v.clone())
                .collect(),
        );
    }
    if rule.bearer {
        sources.push(
            sent.iter()
                .filter(|(n, _)| *n == AUTHORIZATION.as_str())
                .filter_map(|(_, v)| bearer(v))
                .collect(),
        );
    }
    if let (Some(param), Some(q)) = (&rule.query_param, sent_query) {
        sources.push(
            pairs(q)
                .filter(|(k, v)| k == param && !v.is_empty())
                .map(|(_, v)| v.into_bytes())
                .collect(),
        );
    }
    let mut distinct: Vec<&Vec<u8>> = sources.iter().flatten().collect();
    distinct.sort();
    distinct.dedup();
    let ambiguous = sources.iter().any(|s| s.len() > 1) || distinct.len() > 1;

    let input = data.escape_ascii();
    match find_key(&rule, &req) {
        Err(_) => assert!(ambiguous, "ambiguous without two copies: {input}"),
        Ok(found) => {
            assert!(!ambiguous, "a second copy was not noticed: {input}");
            let expected = distinct.first().map(|k| hash_presented(k));
            assert_eq!(found, expected, "the wrong key was found: {input}");
        }
    }

    if let Some(param) = &rule.query_param {
        check_cut(&query, param);
    }
});

/// `Authorization: Bearer <token>`, scheme case-insensitive, token trimmed and non-empty.
fn bearer(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() < 7 || !v[..7].eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let t = v[7..].trim_ascii();
    (!t.is_empty()).then(|| t.to_vec())
}

/// application/x-www-form-urlencoded pairs of a raw query, decoded by hand (`+` is a space,
/// a bad escape stays as it is, invalid UTF-8 becomes U+FFFD), so the model does not share
/// the decoder it checks. An empty piece between two `&` is no pair.
fn pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (decode(k), decode(v))
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `cut_query_param` removes exactly the pairs named `param` and keeps every other piece of
/// the raw query byte for byte, in order; the result carries no copy of the key.
fn check_cut(query: &str, param: &str) {
    let mut removed = false;
    let mut kept: Vec<&str> = Vec::new();
    for piece in query.split('&') {
        let named = !piece.is_empty() && pairs(piece).next().is_some_and(|(k, _)| k == param);
        if named {
            removed = true;
        } else {
            kept.push(piece);
        }
    }
    let cut = cut_query_param(query, param);
    let expected = removed.then(|| kept.join("&"));
    assert_eq!(cut, expected, "cut_query_param({query:?}, {param:?})");
    if let Some(cut) = &cut {
        assert!(
            pairs(cut).all(|(k, _)| k != param),
            "{cut:?} still has {param:?}"
        );
        // The sidecar rebuilds the request target from the cut query: a query the http crate
        // accepted must stay one it accepts, and find_key must find no key there any more.
        if let Ok(uri) = Uri::try_from(format!("/p?{query}")) {
            if uri.query() == Some(query) && !cut.is_empty() {
                let cut_uri = Uri::try_from(format!("/p?{cut}"));
                assert!(
                    cut_uri
                        .as_ref()
                        .is_ok_and(|u| u.query() == Some(cut.as_str())),
                    "{cut:?} is not a valid query"
                );
                let only_query = KeySourceRule {
                    header: None,
                    bearer: false,
                    query_param: Some(param.to_owned()),
                    strip: true,
                    identity_header: HeaderName::from_static("x-keylimit-key"),
                };
                if let Ok(req) = Request::builder().uri(cut_uri.unwrap_or_default()).body(()) {
                    assert!(matches!(find_key(&only_query, &req), Ok(None)), "{cut:?}");
                }
            }
        }
    }
}
