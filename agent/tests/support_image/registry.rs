//! A real registry for tests: Debian's `docker-registry` (distribution 2.x) on 127.0.0.1 with
//! its storage in a temp dir, optionally behind htpasswd basic auth, and `skopeo` to push
//! OCI layouts into it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
pub const SKOPEO_BIN: &str = "/usr/bin/skopeo";

pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    /// Starts a registry; with `user` it requires that user's basic-auth password.
    pub fn start(user: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let auth = user.map(|(name, password)| {
            let hash = bcrypt::hash_with_result(password, 4)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoA);
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{name}:{hash}\n")).unwrap();
            format!(
                "auth:\n  htpasswd:\n    realm: gantry-test\n    path: {}\n",
                htpasswd.display()
            )
        });
        Registry::start_in(dir, auth.as_deref())
    }

    /// Starts a registry whose configuration ends with `auth` (an `auth:` YAML section), its
    /// storage in `dir`.
    pub fn start_in(dir: tempfile::TempDir, auth: Option<&str>) -> Registry {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some(auth) = auth {
            config.push_str(auth);
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Registry {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Pushes the image `name` of an OCI layout to `<addr>/<dest>` with skopeo, keeping its
    /// digests (skopeo would otherwise compress uncompressed layers) unless `extra` asks for a
    /// format conversion.
    pub fn push(&self, layout: &Path, name: &str, dest: &str, extra: &[&str]) {
        let preserve: &[&str] = if extra.contains(&"--format") {
            &[]
        } else {
            &["--preserve-digests"]
        };
        let out = Command::new(SKOPEO_BIN)
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
            ])
            .args(preserve)
            .args(extra)
            .arg(format!("oci:{}:{name}", layout.display()))
            .arg(format!("docker://{}/{dest}", self.addr))
            .env("HOME", layout)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Registry {
    /// Where the registry keeps a blob's bytes (to corrupt them in tests).
    pub fn blob_file(&self, digest: &str) -> std::path::PathBuf {
        let hex = &digest["sha256:".len()..];
        self._dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// What the registry wrote to its standard error (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default()
    }
}
