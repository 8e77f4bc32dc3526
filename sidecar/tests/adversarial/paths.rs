//! Route limits must hold for every spelling of a limited path (issue 11, item 1).

use keylimit_dataplane::{MatrixParameters, PathMatching, Route};

use crate::common::{doc, key, material};
use crate::raw::{get, send};
use crate::{echoed, per_minute, setup};

fn admin_route_doc(matching: PathMatching) -> keylimit_dataplane::PolicyDocument {
    let mut d = doc(per_minute(1_000), vec![key("k")]);
    d.policy.routes = vec![Route {
        usage: None,
        name: "admin".into(),
        path_prefix: "/admin".into(),
        methods: vec![],
        cost: 1,
        limits: Some(per_minute(1)),
    }];
    d.policy.path_matching = matching;
    d
}

fn key_header() -> String {
    format!("X-API-Key: {}", material("k"))
}

#[tokio::test]
async fn every_equivalent_spelling_of_a_limited_path_is_limited() {
    let (_d, _u, sc) = setup(admin_route_doc(PathMatching::default())).await;
    let h = key_header();
    let first = send(sc.traffic_addr, &get("/admin/users", &[&h])).await;
    assert_eq!(first.status, 200, "{first:?}");
    for spelling in [
        "/admin/users",
        "/%61dmin/users",
        "/%61%64%6d%69%6e/users",
        "/admin/./users",
        "/./admin/users",
        "//admin/users",
        "/admin//users",
        "/x/../admin/users",
        "/x/%2e%2e/admin/users",
        "/x/%2E%2E/admin/users",
        "/../admin/users",
        "/%2e/admin/users",
        "/ADMIN/users",
        "/Admin/users",
        "/admin;jsessionid=1/users",
        "/admin;/users",
        "/;/admin/users",
        "/;x=1/admin/users",
        "/admin",
        "/admin/",
    ] {
        let r = send(sc.traffic_addr, &get(spelling, &[&h])).await;
        assert_eq!(r.status, 429, "{spelling} escaped the route limit: {r:?}");
        assert!(r.body.contains("\"name\":\"minute\""), "{spelling}: {r:?}");
    }
    // Whole segments only: `/adminx` is another resource.
    let r = send(sc.traffic_addr, &get("/adminx/users", &[&h])).await;
    assert_eq!(r.status, 200, "{r:?}");
    sc.stop().await;
}

#[tokio::test]
async fn the_app_receives_the_normalised_path_and_the_query_untouched() {
    let (_d, _u, sc) = setup(admin_route_doc(PathMatching::default())).await;
    let h = key_header();
    for (sent, seen) in [
        ("/a/./b/../c//d?x=%2e%2e/&y", "/a/c/d?x=%2e%2e/&y"),
        ("/%7Euser/%41%42c", "/~user/ABc"),
        ("/a%20b/%c3%a9", "/a%20b/%C3%A9"),
        ("/.well-known/x", "/.well-known/x"),
        ("/p;v=1/q", "/p;v=1/q"),
    ] {
        let r = send(sc.traffic_addr, &get(sent, &[&h])).await;
        assert_eq!(r.status, 200, "{sent}: {r:?}");
        let uri = echoed(&r)[":uri"].as_str().unwrap_or_default().to_string();
        assert!(
            uri.ends_with(seen),
            "{sent} reached the app as {uri}, want {seen}"
        );
    }
    sc.stop().await;
}

#[tokio::test]
async fn paths_that_cannot_be_normalised_safely_are_400() {
    let (_d, _u, sc) = setup(admin_route_doc(PathMatching::default())).await;
    let h = key_header();
    for spelling in [
        "/admin%2Fusers",
        "/admin%2fusers",
        "/x%5C..%5Cadmin",
        "/admin/..;/admin/users",
        "/x/.;a=b/admin",
        "/admin%00.json",
        "/admin%zz",
        "/admin%4",
    ] {
        let r = send(sc.traffic_addr, &get(spelling, &[&h])).await;
        assert_eq!(r.status, 400, "{spelling}: {r:?}");
        assert!(r.body.contains("bad_path"), "{spelling}: {r:?}");
    }
    // A raw backslash: refused by the parser or by the sidecar, never forwarded.
    let r = send(sc.traffic_addr, &get("/x\\..\\admin", &[&h])).await;
    assert_eq!(r.status, 400, "{r:?}");
    sc.stop().await;
}

#[tokio::test]
async fn policy_can_make_matching_case_sensitive_and_refuse_matrix_parameters() {
    let (_d, _u, sc) = setup(admin_route_doc(PathMatching {
        case_sensitive: true,
        matrix_parameters: MatrixParameters::Reject,
    }))
    .await;
    let h = key_header();
    assert_eq!(
        send(sc.traffic_addr, &get("/admin/a", &[&h])).await.status,
        200
    );
    assert_eq!(
        send(sc.traffic_addr, &get("/admin/a", &[&h])).await.status,
        429
    );
    // Case-sensitive: `/ADMIN` is another resource to this app, by the policy's word.
    assert_eq!(
        send(sc.traffic_addr, &get("/ADMIN/a", &[&h])).await.status,
        200
    );
    let r = send(sc.traffic_addr, &get("/admin;x=1/a", &[&h])).await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = send(sc.traffic_addr, &get("/other;x=1", &[&h])).await;
    assert_eq!(
        r.status, 400,
        "refused everywhere, not only under routes: {r:?}"
    );
    sc.stop().await;
}

#[tokio::test]
async fn a_free_route_is_served_after_the_key_is_exhausted() {
    let mut d = doc(per_minute(1), vec![key("k")]);
    d.policy.routes = vec![Route {
        usage: None,
        name: "health".into(),
        path_prefix: "/health".into(),
        methods: vec![],
        cost: 0,
        limits: None,
    }];
    let (_d, _u, sc) = setup(d).await;
    let h = key_header();
    assert_eq!(
        send(sc.traffic_addr, &get("/work", &[&h])).await.status,
        200
    );
    assert_eq!(
        send(sc.traffic_addr, &get("/work", &[&h])).await.status,
        429
    );
    for _ in 0..3 {
        let r = send(sc.traffic_addr, &get("/health/deep", &[&h])).await;
        assert_eq!(r.status, 200, "cost 0 is free, not 1: {r:?}");
    }
    sc.stop().await;
}
