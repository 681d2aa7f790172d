//! Connecting to gantry-scheduler's API: where it is (flag, environment, config file), how long a
//! call may take, TLS (a CA, a client certificate) and a bearer token sent with every call.
//!
//! The config file is YAML with the keys `address`, `ca`, `cert`, `key` and `token`; every key
//! is optional and unknown keys are errors. TLS is used when the address is `https://…` or any
//! of `ca`, `cert`, `key` is set (an `http://` address then becomes `https://`); without `ca`
//! the system's root certificates are trusted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tonic::Request;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::pb::events_client::EventsClient;
use crate::pb::images_client::ImagesClient;
use crate::pb::instances_client::InstancesClient;
use crate::pb::nodes_client::NodesClient;
use crate::pb::workloads_client::WorkloadsClient;

/// The scheduler address used when neither a flag, `GANTRY_ADDR` nor the config file gives one.
pub const DEFAULT_ADDRESS: &str = "http://127.0.0.1:7700";
/// How long a unary call may take when `--timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response accepted (a List page of 5,000 workloads with their specs).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// HTTP/2 pings on idle connections, so that a dead scheduler ends a long watch.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read the config file {}: {source}", path.display())]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid YAML of the expected shape.
    #[error(
        "the config file {} is not valid: {message}; it takes the keys address, ca, cert, key and token",
        path.display()
    )]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A PEM file named by the configuration could not be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    ReadPem {
        /// Which file it is (`CA certificate`, `client certificate`, `client key`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Only one of `cert` and `key` is set.
    #[error(
        "a client certificate needs both `cert` and `key` in the config file; set both or neither"
    )]
    HalfIdentity,
    /// The address is not a URI.
    #[error(
        "`{address}` is not a valid scheduler address ({message}); use http://HOST:PORT or https://HOST:PORT"
    )]
    Address {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        message: String,
    },
    /// The token cannot be sent as a header.
    #[error("the token in the config file is not a valid header value; it must be printable ASCII")]
    Token,
    /// The TLS settings were refused.
    #[error("cannot set up TLS for {address}: {message}")]
    Tls {
        /// The scheduler address.
        address: String,
        /// Why.
        message: String,
    },
    /// Nothing answered at the address.
    #[error(
        "cannot reach the scheduler at {address}: {reason}; is it running? (`gantry up` starts a local cluster)"
    )]
    Unreachable {
        /// The scheduler address.
        address: String,
        /// The innermost cause, like `connection refused`.
        reason: String,
    },
}

/// The config file, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Scheduler address (`https://scheduler.example:7700`).
    #[serde(default)]
    pub address: Option<String>,
    /// PEM file of the CA certificate(s) that sign the scheduler's certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM file of the client certificate (with `key`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key (with `cert`).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Bearer token sent as `authorization: Bearer <token>` with every call.
    #[serde(default)]
    pub token: Option<String>,
}

impl FileConfig {
    /// Reads and parses the config file at `path`. Relative `ca`, `cert` and `key` paths are
    /// taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = if text.trim().is_empty() {
            FileConfig::default()
        } else {
            serde_saphyr::from_str::<FileConfig>(&text).map_err(|e| Error::ParseConfig {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
        };
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [&mut config.ca, &mut config.cert, &mut config.key]
            .into_iter()
            .flatten()
        {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }

    /// The config file used when none is named: the first of
    /// `$XDG_CONFIG_HOME/gantry/config.yaml` (or `~/.config/gantry/config.yaml`) and
    /// `/etc/gantry/config.yaml` that exists.
    pub fn default_path() -> Option<PathBuf> {
        let user = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|d| !d.is_empty())
                    .map(|home| PathBuf::from(home).join(".config"))
            })
            .map(|dir| dir.join("gantry").join("config.yaml"));
        user.into_iter()
            .chain([PathBuf::from("/etc/gantry/config.yaml")])
            .find(|p| p.is_file())
    }
}

/// Everything needed to connect, resolved from flags, the environment and the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Scheduler address as given (`http://127.0.0.1:7700`, `scheduler:7700`).
    pub address: String,
    /// CA certificate PEM file.
    pub ca: Option<PathBuf>,
    /// Client certificate PEM file.
    pub cert: Option<PathBuf>,
    /// Client key PEM file.
    pub key: Option<PathBuf>,
    /// Bearer token.
    pub token: Option<String>,
    /// How long a unary call may take.
    pub timeout: Duration,
}

impl Settings {
    /// The settings from an address flag (which already holds `GANTRY_ADDR` when the flag is
    /// absent), the config file and the timeout; the flag wins over the file, and
    /// [`DEFAULT_ADDRESS`] applies when neither gives an address.
    pub fn resolve(address: Option<String>, file: FileConfig, timeout: Duration) -> Self {
        let FileConfig {
            address: file_address,
            ca,
            cert,
            key,
            token,
        } = file;
        Settings {
            address: address
                .filter(|a| !a.is_empty())
                .or(file_address)
                .unwrap_or_else(|| DEFAULT_ADDRESS.to_string()),
            ca,
            cert,
            key,
            token: token.filter(|t| !t.is_empty()),
            timeout,
        }
    }

    /// Whether the connection uses TLS.
    pub fn uses_tls(&self) -> bool {
        self.address.starts_with("https://")
            || self.ca.is_some()
            || self.cert.is_some()
            || self.key.is_some()
    }

    /// The address as a URI: a scheme added when missing (`https` with TLS, else `http`), and
    /// `http` replaced by `https` when TLS is configured.
    pub fn uri(&self) -> String {
        let tls = self.uses_tls();
        let rest = if let Some(rest) = self.address.strip_prefix("http://") {
            rest
        } else if let Some(rest) = self.address.strip_prefix("https://") {
            rest
        } else {
            &self.address
        };
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://{}", rest.trim_end_matches('/'))
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Debug, Clone)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// The channel every client of this module runs on.
pub type AuthChannel = InterceptedService<Channel, Auth>;

/// A connection to one scheduler, with a client for each service.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    auth: Auth,
    address: String,
    timeout: Duration,
}

impl Client {
    /// The address it is connected to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// How long a unary call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A request for a unary call, carrying the call timeout (`grpc-timeout`).
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// The Workloads service.
    pub fn workloads(&self) -> WorkloadsClient<AuthChannel> {
        WorkloadsClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The Instances service.
    pub fn instances(&self) -> InstancesClient<AuthChannel> {
        InstancesClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The Nodes service.
    pub fn nodes(&self) -> NodesClient<AuthChannel> {
        NodesClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The Images service.
    pub fn images(&self) -> ImagesClient<AuthChannel> {
        ImagesClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The Events service.
    pub fn events(&self) -> EventsClient<AuthChannel> {
        EventsClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::ReadPem {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The innermost cause of an error, in lowercase words: `connection refused` rather than
/// `transport error`.
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(source) = current.source() {
        current = source;
    }
    if let Some(io) = current.downcast_ref::<std::io::Error>() {
        match io.kind() {
            std::io::ErrorKind::ConnectionRefused => return "connection refused".to_string(),
            std::io::ErrorKind::TimedOut => return "connection timed out".to_string(),
            _ => {}
        }
    }
    let text = current.to_string();
    // Drop "(os error N)" and start lowercase, as our messages do.
    let text = match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "unknown error".to_string(),
    }
}

/// Connects to the scheduler (eagerly, so that an unreachable one is reported at once).
pub async fn connect(settings: &Settings) -> Result<Client, Error> {
    let uri = settings.uri();
    let address_error = |message: String| Error::Address {
        address: settings.address.clone(),
        message,
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| address_error(root_cause(&e)))?
        .connect_timeout(settings.timeout)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_while_idle(true);
    if settings.uses_tls() {
        let mut tls = ClientTlsConfig::new();
        match &settings.ca {
            Some(ca) => {
                tls = tls.ca_certificate(Certificate::from_pem(read_pem("CA certificate", ca)?))
            }
            None => tls = tls.with_native_roots(),
        }
        match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read_pem("client certificate", cert)?,
                    read_pem("client key", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err(Error::HalfIdentity),
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| Error::Tls {
            address: uri.clone(),
            message: root_cause(&e),
        })?;
    }
    let header = match &settings.token {
        Some(token) => {
            Some(MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| Error::Token)?)
        }
        None => None,
    };
    let channel = endpoint.connect().await.map_err(|e| Error::Unreachable {
        address: uri.clone(),
        reason: root_cause(&e),
    })?;
    Ok(Client {
        channel,
        auth: Auth { header },
        address: uri,
        timeout: settings.timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(address: &str) -> Settings {
        Settings::resolve(Some(address.into()), FileConfig::default(), DEFAULT_TIMEOUT)
    }

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(settings("127.0.0.1:7700").uri(), "http://127.0.0.1:7700");
        assert_eq!(settings("http://h:1/").uri(), "http://h:1");
        assert_eq!(settings("https://h:1").uri(), "https://h:1");
        let tls = Settings {
            ca: Some("ca.pem".into()),
            ..settings("http://h:1")
        };
        assert_eq!(tls.uri(), "https://h:1");
    }

    #[test]
    fn the_flag_wins_over_the_file_and_the_default_comes_last() {
        let file = FileConfig {
            address: Some("https://file:1".into()),
            token: Some(String::new()),
            ..FileConfig::default()
        };
        let s = Settings::resolve(Some("http://flag:1".into()), file.clone(), DEFAULT_TIMEOUT);
        assert_eq!(s.address, "http://flag:1");
        assert_eq!(s.token, None);
        let s = Settings::resolve(None, file, DEFAULT_TIMEOUT);
        assert_eq!(s.address, "https://file:1");
        let s = Settings::resolve(None, FileConfig::default(), DEFAULT_TIMEOUT);
        assert_eq!(s.address, DEFAULT_ADDRESS);
    }

    #[test]
    fn config_files_resolve_relative_paths_and_reject_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "address: https://s:7700\nca: ca.pem\ncert: /abs/cert.pem\nkey: k.pem\ntoken: t0k\n",
        )
        .unwrap();
        let config = FileConfig::load(&path).unwrap();
        assert_eq!(config.address.as_deref(), Some("https://s:7700"));
        assert_eq!(config.ca, Some(dir.path().join("ca.pem")));
        assert_eq!(config.cert, Some(PathBuf::from("/abs/cert.pem")));
        assert_eq!(config.token.as_deref(), Some("t0k"));
        std::fs::write(&path, "adress: x\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("adress"), "{err}");
    }
}
