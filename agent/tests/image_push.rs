//! Pushes to a real registry: Debian's `docker-registry` on 127.0.0.1, open, behind htpasswd
//! basic auth, and behind bearer-token auth (the Docker Hub flow) with a token server this test
//! runs. Images are built at test time from busybox-static and imported into the store; what is
//! pushed is pulled back into a fresh store and compared by manifest digest. Skipped without the
//! tools on a laptop; fails under CI.

mod support_image;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;

use gantry_agent::image::pull::{Credentials, LayerState, PullError};
use gantry_agent::image::push::PushError;
use gantry_agent::image::{
    ImageError, ImageRef, ImageStore, ProgressSink, PullOptions, PushOptions,
};
use support_image::registry::{REGISTRY_BIN, Registry};
use support_image::*;

fn can_run() -> bool {
    require("docker-registry", Path::new(REGISTRY_BIN).exists())
        && require("busybox-static (/bin/busybox)", Path::new(BUSYBOX).exists())
}

fn busybox_image(extra: &'static [u8]) -> Built {
    let app = layer(&[Entry::File("app/marker", extra)], Compress::Gzip);
    build(vec![busybox_layer(), app], &["/bin/sh"])
}

fn new_store() -> (tempfile::TempDir, ImageStore) {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    (tmp, store)
}

fn r(s: &str) -> ImageRef {
    ImageRef::parse(s).unwrap()
}

/// Imports `image` into `store` and tags it `reference`.
fn import_as(store: &ImageStore, image: &Built, reference: &str) {
    store
        .import(&oci_layout_tar(&[(image, Some("built"))])[..])
        .unwrap();
    store.tag(&image.digest, reference).unwrap();
}

fn with_credentials(user: &str, password: &str) -> PushOptions {
    PushOptions {
        credentials: Some(Credentials {
            username: user.into(),
            password: password.into(),
        }),
        ..PushOptions::default()
    }
}

/// The store's images and blobs: what a failed push must leave as it was.
fn contents(store: &ImageStore) -> (BTreeSet<String>, Vec<String>) {
    let images = store.list().unwrap();
    let refs = images.iter().flat_map(|i| i.references.clone()).collect();
    (refs, store.blobs().list().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_an_image_pulls_it_back_and_skips_blobs_the_registry_has() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(None);
    let image = busybox_image(b"pushed");
    let (_tmp, store) = new_store();
    let name = format!("{}/test/pushed:1", registry.addr);
    import_as(&store, &image, &name);

    let (sink, rx) = ProgressSink::channel();
    let report = store
        .push(&r(&name), &PushOptions::default(), sink)
        .await
        .unwrap();
    assert_eq!(report.digest, image.digest);
    let mut sent: Vec<_> = image.layers.iter().map(|l| sha256(&l.blob)).collect();
    sent.push(image.config_digest.clone());
    assert_eq!(report.uploaded, sent);
    assert!(report.existing.is_empty(), "{report:?}");
    let layer_bytes: u64 = image.layers.iter().map(|l| l.blob.len() as u64).sum();
    assert_eq!(
        report.bytes_uploaded,
        layer_bytes + image.config.len() as u64
    );
    let progress = rx.borrow().clone();
    assert_eq!(progress.layers.len(), 2);
    for l in &progress.layers {
        assert_eq!(l.state, LayerState::Done, "{l:?}");
        assert_eq!(l.done, l.total, "{l:?}");
    }

    // Pulled back into another store, it is the same image, byte for byte.
    let (_tmp2, fresh) = new_store();
    let pulled = fresh
        .pull(&r(&name), &PullOptions::default(), ProgressSink::none())
        .await
        .unwrap();
    assert_eq!(pulled.digest, image.digest);
    assert_eq!(pulled.config_digest, image.config_digest);
    assert_eq!(
        fresh.blobs().read_small(&pulled.digest, 1 << 20).unwrap(),
        image.manifest
    );

    // Pushed again, nothing is sent.
    let (sink, rx) = ProgressSink::channel();
    let again = store
        .push(&r(&name), &PushOptions::default(), sink)
        .await
        .unwrap();
    assert_eq!(again.digest, image.digest);
    assert!(again.uploaded.is_empty(), "{again:?}");
    assert_eq!(again.bytes_uploaded, 0);
    assert_eq!(again.existing, sent);
    assert!(
        rx.borrow()
            .layers
            .iter()
            .all(|l| l.state == LayerState::Exists)
    );

    // An image sharing the busybox layer, to another repository of the registry: only its
    // own layer and config are sent.
    let other = busybox_image(b"other");
    let other_name = format!("{}/test/other:2", registry.addr);
    import_as(&store, &other, &other_name);
    let report = store
        .push(
            &r(&other_name),
            &PushOptions::default(),
            ProgressSink::none(),
        )
        .await
        .unwrap();
    // The registry links a blob into a repository only when it is pushed there, so the shared
    // layer is sent to the new repository (no cross-repository mount); pushed to the same
    // repository under another tag, only the image's new blobs go.
    assert_eq!(report.uploaded.len(), 3, "{report:?}");
    let same_repo = format!("{}/test/pushed:other", registry.addr);
    store.tag(&other.digest, &same_repo).unwrap();
    let report = store
        .push(
            &r(&same_repo),
            &PushOptions::default(),
            ProgressSink::none(),
        )
        .await
        .unwrap();
    assert_eq!(
        report.uploaded,
        [sha256(&other.layers[1].blob), other.config_digest.clone()],
        "{report:?}"
    );
    assert_eq!(report.existing, [sha256(&other.layers[0].blob)]);

    // An image the store does not have.
    let err = store
        .push(
            &r(&format!("{}/test/absent:1", registry.addr)),
            &PushOptions::default(),
            ProgressSink::none(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");

    // A registry nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("127.0.0.1:{port}/test/pushed:1");
    store.tag(&image.digest, &nowhere).unwrap();
    let err = store
        .push(&r(&nowhere), &PushOptions::default(), ProgressSink::none())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::Push(PushError::Unreachable { .. })),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("127.0.0.1:{port}")) && message.contains("unreachable"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_push_needs_the_right_credentials() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(Some(("gantry", "pa55word")));
    let image = busybox_image(b"basic");
    let (_tmp, store) = new_store();
    let name = format!("{}/private/busybox:1", registry.addr);
    import_as(&store, &image, &name);
    let before = contents(&store);

    let anonymous = store
        .push(&r(&name), &PushOptions::default(), ProgressSink::none())
        .await
        .unwrap_err();
    assert!(
        matches!(
            anonymous,
            ImageError::Push(PushError::Unauthorized {
                anonymous: true,
                ..
            })
        ),
        "{anonymous}"
    );
    let wrong = store
        .push(
            &r(&name),
            &with_credentials("gantry", "not-the-password-xyz"),
            ProgressSink::none(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            wrong,
            ImageError::Push(PushError::Unauthorized {
                anonymous: false,
                ..
            })
        ),
        "{wrong}"
    );
    let message = wrong.to_string();
    assert!(
        message.contains("401") && message.contains(&registry.addr),
        "{message}"
    );
    assert!(
        !format!("{wrong} {wrong:?}").contains("not-the-password"),
        "credentials leaked: {wrong:?}"
    );
    // Nothing changed: the store is as it was, the registry has no such image.
    assert_eq!(contents(&store), before);
    let pull_creds = PullOptions {
        credentials: Some(Credentials {
            username: "gantry".into(),
            password: "pa55word".into(),
        }),
        ..PullOptions::default()
    };
    let (_tmp2, fresh) = new_store();
    let err = fresh
        .pull(&r(&name), &pull_creds, ProgressSink::none())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::Pull(PullError::NotFound { .. })),
        "{err}"
    );

    let report = store
        .push(
            &r(&name),
            &with_credentials("gantry", "pa55word"),
            ProgressSink::none(),
        )
        .await
        .unwrap();
    assert_eq!(report.digest, image.digest);
    assert_eq!(contents(&store), before);
    let pulled = fresh
        .pull(&r(&name), &pull_creds, ProgressSink::none())
        .await
        .unwrap();
    assert_eq!(pulled.digest, image.digest);
}

/// A token server for distribution's `auth: token`: issues JWTs signed (ES256) by a key whose
/// self-signed certificate is the registry's `rootcertbundle` and goes in the `x5c` header.
/// Anyone gets `pull`; `push` only the user with the password.
mod token {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode, Uri, header};
    use axum::response::{IntoResponse, Response};
    use base64::Engine as _;
    use rcgen::SigningKey as _;

    pub const SERVICE: &str = "gantry-test-registry";
    pub const ISSUER: &str = "gantry-test-token-issuer";
    pub const USER: &str = "pusher";
    pub const PASSWORD: &str = "t0ken-pa55";

    pub struct Server {
        /// `http://127.0.0.1:<port>/token`.
        pub realm: String,
        /// The certificate, PEM, for the registry's `rootcertbundle`.
        pub cert_pem: String,
        /// Tokens issued, and token requests refused.
        pub issued: Arc<AtomicUsize>,
        pub refused: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    struct Issuer {
        key: rcgen::KeyPair,
        cert_der: Vec<u8>,
        issued: Arc<AtomicUsize>,
        refused: Arc<AtomicUsize>,
    }

    pub async fn start() -> Server {
        let key = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256: ES256
        let mut params = rcgen::CertificateParams::new(vec!["token.gantry.test".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ISSUER);
        let cert = params.self_signed(&key).unwrap();
        let issued = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let issuer = Arc::new(Issuer {
            key,
            cert_der: cert.der().to_vec(),
            issued: issued.clone(),
            refused: refused.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/token", axum::routing::get(issue))
            .with_state(issuer);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Server {
            realm,
            cert_pem: cert.pem(),
            issued,
            refused,
            task,
        }
    }

    fn b64url(data: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
    }

    /// A DER ECDSA signature (`SEQUENCE { r INTEGER, s INTEGER }`) as JWS wants it: r and s as
    /// 32 big-endian bytes each.
    fn jws_signature(der: &[u8]) -> Vec<u8> {
        assert_eq!(der[0], 0x30, "not a DER sequence");
        let mut at = 2;
        let mut out = Vec::with_capacity(64);
        for _ in 0..2 {
            assert_eq!(der[at], 0x02, "not a DER integer");
            let len = der[at + 1] as usize;
            let mut int = &der[at + 2..at + 2 + len];
            while int.len() > 32 && int[0] == 0 {
                int = &int[1..];
            }
            out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
            out.extend_from_slice(int);
            at += 2 + len;
        }
        out
    }

    fn query_param(uri: &Uri, name: &str) -> Vec<String> {
        uri.query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| percent_decode(v))
            .collect()
    }

    fn percent_decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    }

    async fn issue(State(issuer): State<Arc<Issuer>>, headers: HeaderMap, uri: Uri) -> Response {
        // Who asks: anonymous, the user with the password, or someone refused.
        let user = match headers.get(header::AUTHORIZATION) {
            None => None,
            Some(value) => {
                let decoded = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Basic "))
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .and_then(|b| String::from_utf8(b).ok());
                if decoded.as_deref() != Some(&format!("{USER}:{PASSWORD}")) {
                    issuer.refused.fetch_add(1, Ordering::SeqCst);
                    return (StatusCode::UNAUTHORIZED, "wrong user name or password")
                        .into_response();
                }
                Some(USER)
            }
        };
        if query_param(&uri, "service") != [SERVICE] {
            return (StatusCode::BAD_REQUEST, "unknown service").into_response();
        }
        let access: Vec<serde_json::Value> = query_param(&uri, "scope")
            .iter()
            .filter_map(|scope| {
                let mut parts = scope.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                let granted: Vec<&str> = actions
                    .split(',')
                    .filter(|a| *a == "pull" || (*a == "push" && user.is_some()))
                    .collect();
                Some(serde_json::json!({"type": kind, "name": name, "actions": granted}))
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let n = issuer.issued.fetch_add(1, Ordering::SeqCst);
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(&issuer.cert_der)],
        });
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": user.unwrap_or(""),
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("token-{n}"),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let der = issuer.key.sign(signing_input.as_bytes()).unwrap();
        let jwt = format!("{signing_input}.{}", b64url(&jws_signature(&der)));
        let body = serde_json::json!({"token": jwt, "expires_in": 300, "issued_at": ""});
        (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_registry_pulls_anonymously_and_pushes_with_credentials() {
    if !can_run() {
        return;
    }
    let tokens = token::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("token-root.pem");
    std::fs::write(&bundle, &tokens.cert_pem).unwrap();
    let auth = format!(
        "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
        tokens.realm,
        token::SERVICE,
        token::ISSUER,
        bundle.display()
    );
    let registry = Registry::start_in(dir, Some(&auth));
    let image = busybox_image(b"bearer");
    let (_tmp, store) = new_store();
    let name = format!("{}/hub/busybox:1", registry.addr);
    import_as(&store, &image, &name);
    let before = contents(&store);

    // Without credentials the token grants pull only: the registry refuses the upload.
    let err = store
        .push(&r(&name), &PushOptions::default(), ProgressSink::none())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Push(PushError::Unauthorized {
                anonymous: true,
                ..
            })
        ),
        "{err}\nregistry log:\n{}",
        registry.log()
    );
    assert!(err.to_string().contains("credentials"), "{err}");
    assert!(
        tokens.issued.load(Ordering::SeqCst) > 0,
        "no token asked for"
    );
    // A wrong password: the token server refuses it.
    let err = store
        .push(
            &r(&name),
            &with_credentials(token::USER, "wrong-password-xyz"),
            ProgressSink::none(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Push(PushError::Unauthorized {
                anonymous: false,
                ..
            })
        ),
        "{err}"
    );
    assert!(tokens.refused.load(Ordering::SeqCst) > 0);
    assert_eq!(contents(&store), before);

    let issued_before = tokens.issued.load(Ordering::SeqCst);
    let report = store
        .push(
            &r(&name),
            &with_credentials(token::USER, token::PASSWORD),
            ProgressSink::none(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\nregistry log:\n{}", registry.log()));
    assert_eq!(report.digest, image.digest);
    assert_eq!(report.uploaded.len(), 3, "{report:?}");
    assert!(tokens.issued.load(Ordering::SeqCst) > issued_before);

    // Anyone may pull: oci-client follows the registry's challenge to the token server.
    let (_tmp2, fresh) = new_store();
    let issued_before = tokens.issued.load(Ordering::SeqCst);
    let pulled = fresh
        .pull(&r(&name), &PullOptions::default(), ProgressSink::none())
        .await
        .unwrap_or_else(|e| panic!("{e}\nregistry log:\n{}", registry.log()));
    assert_eq!(pulled.digest, image.digest);
    assert!(tokens.issued.load(Ordering::SeqCst) > issued_before);
}

/// Runs `gantry-agent image ARGS…` on the data directory `data`.
fn agent_image(data: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gantry-agent"))
        .arg("image")
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .unwrap()
}

fn stdout_ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn stderr_failed(out: std::process::Output) -> String {
    assert!(!out.status.success(), "succeeded: {out:?}");
    String::from_utf8(out.stderr).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_verbs_tag_push_and_save() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(None);
    let image = busybox_image(b"cli");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("agent");
    let tarball = tmp.path().join("in.tar");
    std::fs::write(&tarball, oci_layout_tar(&[(&image, Some("built"))])).unwrap();
    stdout_ok(agent_image(&data, &["import", tarball.to_str().unwrap()]));

    let name = format!("{}/cli/busybox:1", registry.addr);
    let out = stdout_ok(agent_image(&data, &["tag", &image.digest, &name]));
    assert_eq!(out, format!("tagged {name} {}\n", image.digest));
    let out = stdout_ok(agent_image(&data, &["push", &name]));
    assert!(
        out.starts_with(&format!("pushed {name} {} (3 blobs sent", image.digest)),
        "{out}"
    );
    let out = stdout_ok(agent_image(&data, &["push", &name]));
    assert!(
        out.contains("(0 blobs sent, 0 bytes; 3 already in the registry)"),
        "{out}"
    );

    // Saved and imported into another store: the same image.
    let saved = tmp.path().join("out/saved.tar");
    std::fs::create_dir_all(saved.parent().unwrap()).unwrap();
    stdout_ok(agent_image(
        &data,
        &["save", &name, "-o", saved.to_str().unwrap()],
    ));
    let (_tmp2, fresh) = new_store();
    let file = std::io::BufReader::new(std::fs::File::open(&saved).unwrap());
    let imported = fresh.import(file).unwrap();
    assert_eq!(imported[0].digest, image.digest);

    // Unknown images: a clear error, and no file left behind.
    let absent = format!("{}/cli/absent:1", registry.addr);
    let bad = tmp.path().join("out/absent.tar");
    let err = stderr_failed(agent_image(
        &data,
        &["save", &absent, "-o", bad.to_str().unwrap()],
    ));
    assert!(
        err.contains("cli/absent:1") && err.contains("not found"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(saved.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["saved.tar"]);
    let err = stderr_failed(agent_image(&data, &["push", &absent]));
    assert!(
        err.contains("cli/absent:1") && err.contains("not found"),
        "{err}"
    );
    let err = stderr_failed(agent_image(&data, &["tag", "nosuch:1", &absent]));
    assert!(err.contains("nosuch") && err.contains("not found"), "{err}");
    let err = stderr_failed(agent_image(
        &data,
        &["tag", &image.digest, "Not A Reference"],
    ));
    assert!(err.contains("Not A Reference"), "{err}");
}
