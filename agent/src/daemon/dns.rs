//! The node's name responder: a small DNS server on the bridge gateway address (UDP and TCP,
//! port 53) that answers `<workload>.gantry.` with the addresses of the workload's Ready
//! instances anywhere in the cluster, and forwards every other query to the host's resolvers.
//!
//! The scheduler pushes the table ([`Names`]) over the node session: the complete table once
//! per session, then the workloads that changed. Containers on the node network get the
//! gateway as their only `nameserver`, with `search gantry`, so `web` and `web.gantry` both
//! find workload `web`.
//!
//! Answers: `A` (and `AAAA` for IPv6 instances) with a record per Ready instance and a short
//! TTL ([`TTL_SECS`]), so clients follow instances coming and going; other types of a known
//! name are an empty NOERROR; an unknown name under `gantry.` is NXDOMAIN. Forwarded queries go
//! over UDP to the `nameserver`s of the host's resolv.conf in turn, [`FORWARD_TIMEOUT`] in all,
//! and a SERVFAIL goes back when none answers. The responder binds once the gateway address
//! exists (the bridge appears with the first attachment) and retries until then.
//!
//! Messages are parsed and built with `hickory-proto`; only the TCP length prefix is framed
//! here.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gantry::pb;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

/// The domain instance names live under.
pub const DOMAIN: &str = "gantry";
/// TTL of the answers, in seconds: short, as instances come and go.
pub const TTL_SECS: u32 = 5;
/// How long a forwarded query may take, over every upstream resolver together.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// How often binding is tried again while the gateway address does not exist yet.
const BIND_RETRY: Duration = Duration::from_secs(1);
/// Forwarded queries in flight at once; more are answered SERVFAIL at once.
const FORWARDS_IN_FLIGHT: usize = 256;
/// A TCP connection idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// EDNS payload size advertised in local answers.
const EDNS_PAYLOAD: u16 = 1232;

/// Workload → the addresses of its Ready instances, as the scheduler last sent them.
pub type Names = BTreeMap<String, Vec<IpAddr>>;

/// Where the responder listens and whom it forwards to.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The port (53; tests use others).
    pub port: u16,
    /// The host's resolv.conf, whose `nameserver`s get the queries that are not Gantry's.
    pub resolv_conf: PathBuf,
}

impl Default for DnsConfig {
    fn default() -> DnsConfig {
        DnsConfig {
            port: 53,
            resolv_conf: "/etc/resolv.conf".into(),
        }
    }
}

/// Applies a `names` message to `names`: a complete table replaces it, a delta replaces the
/// listed workloads and drops the removed ones. Addresses that do not parse are logged and
/// left out; an undecodable message changes nothing.
pub fn apply(names: &mut Names, message: pb::NameTable) -> Result<(), prost::DecodeError> {
    let pb::NameTable {
        delta,
        workloads,
        removed,
    } = message;
    let entries = <pb::NameEntries as prost::Message>::decode(workloads)?;
    if !delta {
        names.clear();
    }
    for workload in removed {
        names.remove(&workload);
    }
    for entry in entries.workloads {
        let pb::WorkloadAddresses {
            workload,
            addresses,
        } = entry;
        let addresses: Vec<IpAddr> = addresses
            .iter()
            .filter_map(|a| match a.parse() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    warn!(%workload, address = %a, "unreadable instance address ignored");
                    None
                }
            })
            .collect();
        if addresses.is_empty() {
            names.remove(&workload);
        } else {
            names.insert(workload.to_ascii_lowercase(), addresses);
        }
    }
    Ok(())
}

/// The container's /etc/resolv.conf with the responder at `gateway`: the host's `search`
/// domains after `gantry`, and the host's `options`.
pub fn resolv_conf(gateway: IpAddr, host: &str) -> String {
    let mut search = vec![DOMAIN.to_owned()];
    let mut options = String::new();
    for line in host.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search") | Some("domain") => search.extend(
                words
                    .map(|w| w.trim_end_matches('.').to_owned())
                    .filter(|w| !w.is_empty() && w != DOMAIN),
            ),
            Some("options") => {
                options.push_str(line.trim());
                options.push('\n');
            }
            _ => {}
        }
    }
    format!(
        "nameserver {gateway}\nsearch {}\n{options}",
        search.join(" ")
    )
}

/// The nameservers of a resolv.conf, as UDP addresses on port 53.
pub fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            // A scoped IPv6 address ("fe80::1%eth0") cannot be used from here.
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// What to do with a query.
#[derive(Debug)]
pub enum Reply {
    /// Answer with this message.
    Local(Message),
    /// Not Gantry's: forward it.
    Forward,
}

/// The answer to `query` from `names`, or [`Reply::Forward`] for a name outside `gantry.`.
pub fn answer(query: &Message, names: &Names) -> Reply {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = query.metadata.checking_disabled;
    response.add_queries(query.queries.iter().cloned());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    let [question] = query.queries.as_slice() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return Reply::Local(response);
    };
    if query.metadata.message_type != MessageType::Query {
        response.metadata.response_code = ResponseCode::FormErr;
        return Reply::Local(response);
    }
    if query.metadata.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return Reply::Local(response);
    }
    let name = question.name();
    let labels: Vec<String> = name
        .iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    if labels.last().map(String::as_str) != Some(DOMAIN) {
        return Reply::Forward;
    }
    response.metadata.authoritative = true;
    match labels.as_slice() {
        // The zone itself: it exists, holds no addresses.
        [_] => {}
        [workload, _] => match names.get(workload) {
            Some(addresses) => {
                let mut fqdn = name.to_lowercase();
                fqdn.set_fqdn(true);
                for ip in addresses {
                    let rdata = match (question.query_type(), ip) {
                        (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                        (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                        _ => continue,
                    };
                    response.add_answer(Record::from_rdata(fqdn.clone(), TTL_SECS, rdata));
                }
            }
            None => response.metadata.response_code = ResponseCode::NXDomain,
        },
        _ => response.metadata.response_code = ResponseCode::NXDomain,
    }
    Reply::Local(response)
}

/// Encodes `response` for a UDP client that accepts `limit` bytes: truncated (TC set, no
/// records) when it does not fit, so that the client asks again over TCP.
fn encode_udp(response: &Message, limit: u16) -> Option<Vec<u8>> {
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= usize::from(limit) {
        return Some(bytes);
    }
    response.truncate().to_vec().ok()
}

/// A SERVFAIL for a query that could not be forwarded.
fn servfail(query: &Message) -> Option<Vec<u8>> {
    let mut response = Message::error_msg(
        query.metadata.id,
        query.metadata.op_code,
        ResponseCode::ServFail,
    );
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_queries(query.queries.iter().cloned());
    response.to_vec().ok()
}

/// A FORMERR for bytes that are not a DNS query (`None` when not even the id is there).
fn formerr(bytes: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// Sends `query` (as received) to each upstream in turn over UDP until one answers with the
/// same id, within `timeout` in all; `None` when none did.
pub async fn forward(query: &[u8], upstreams: &[SocketAddr], timeout: Duration) -> Option<Vec<u8>> {
    if query.len() < 2 || upstreams.is_empty() {
        return None;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    // Each upstream gets an equal share of what is left.
    for (n, upstream) in upstreams.iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / u32::try_from(upstreams.len() - n).unwrap_or(1);
        let attempt = async {
            let local: SocketAddr = match upstream {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let socket = UdpSocket::bind(local).await.ok()?;
            socket.connect(upstream).await.ok()?;
            socket.send(query).await.ok()?;
            let mut buf = vec![0u8; 65535];
            loop {
                let len = socket.recv(&mut buf).await.ok()?;
                // A stray datagram with another id is not the answer.
                if len >= 2 && buf[..2] == query[..2] {
                    buf.truncate(len);
                    return Some(buf);
                }
            }
        };
        match tokio::time::timeout(share, attempt).await {
            Ok(Some(answer)) => return Some(answer),
            Ok(None) => debug!(%upstream, "forwarding to the upstream resolver failed"),
            Err(_) => debug!(%upstream, "the upstream resolver did not answer in time"),
        }
    }
    None
}

/// What the listeners share.
struct Responder {
    names: watch::Receiver<Names>,
    upstreams: Vec<SocketAddr>,
    forwards: Semaphore,
}

impl Responder {
    /// The response to the message `bytes` (`None`: send nothing), for a UDP client when
    /// `udp` (sizes limited, truncation) or a TCP one.
    async fn respond(&self, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
        let Ok(query) = Message::from_vec(bytes) else {
            return formerr(bytes);
        };
        let reply = answer(&query, &self.names.borrow());
        match reply {
            Reply::Local(response) if udp => encode_udp(&response, query.max_payload()),
            Reply::Local(response) => response.to_vec().ok(),
            Reply::Forward => {
                let Ok(_permit) = self.forwards.try_acquire() else {
                    return servfail(&query);
                };
                match forward(bytes, &self.upstreams, FORWARD_TIMEOUT).await {
                    Some(answer) => Some(answer),
                    None => servfail(&query),
                }
            }
        }
    }
}

/// Serves queries on `udp` and `tcp` until the future is dropped.
async fn serve(udp: UdpSocket, tcp: TcpListener, responder: Arc<Responder>) {
    let udp = Arc::new(udp);
    let udp_loop = {
        let responder = responder.clone();
        async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let (len, client) = match udp.recv_from(&mut buf).await {
                    Ok(received) => received,
                    Err(err) => {
                        debug!(%err, "dns receive failed");
                        continue;
                    }
                };
                let bytes = buf[..len].to_vec();
                let (udp, responder) = (udp.clone(), responder.clone());
                tokio::spawn(async move {
                    if let Some(response) = responder.respond(&bytes, true).await {
                        let _ = udp.send_to(&response, client).await;
                    }
                });
            }
        }
    };
    let tcp_loop = async move {
        loop {
            match tcp.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_tcp(stream, responder.clone()));
                }
                Err(err) => {
                    debug!(%err, "dns accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    tokio::join!(udp_loop, tcp_loop);
}

/// One TCP client: length-prefixed messages, answered in order, until EOF or idleness.
async fn serve_tcp(mut stream: TcpStream, responder: Arc<Responder>) {
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
            return;
        };
        let mut bytes = vec![0u8; usize::from(len)];
        if stream.read_exact(&mut bytes).await.is_err() {
            return;
        }
        let Some(response) = responder.respond(&bytes, false).await else {
            continue;
        };
        let Ok(len) = u16::try_from(response.len()) else {
            continue;
        };
        if stream.write_u16(len).await.is_err() || stream.write_all(&response).await.is_err() {
            return;
        }
    }
}

/// Binds UDP and TCP on `address`.
async fn bind(address: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(address).await?;
    let tcp = TcpListener::bind(address).await?;
    Ok((udp, tcp))
}

/// Runs the responder until `gateways` closes: listens on the latest gateway address (binding
/// again when it changes, retrying while the address does not exist yet) and answers from the
/// latest `names`.
pub async fn run(
    config: DnsConfig,
    mut gateways: watch::Receiver<Option<IpAddr>>,
    names: watch::Receiver<Names>,
) {
    let mut last_error: Option<(IpAddr, std::io::ErrorKind)> = None;
    loop {
        let gateway = *gateways.borrow_and_update();
        if let Some(gateway) = gateway {
            let address = SocketAddr::new(gateway, config.port);
            match bind(address).await {
                Ok((udp, tcp)) => {
                    last_error = None;
                    let host = std::fs::read_to_string(&config.resolv_conf).unwrap_or_default();
                    // The responder never forwards to itself.
                    let upstreams: Vec<SocketAddr> = upstreams(&host)
                        .into_iter()
                        .filter(|u| u.ip() != gateway)
                        .collect();
                    info!(%address, upstreams = ?upstreams, "name responder listening");
                    let responder = Arc::new(Responder {
                        names: names.clone(),
                        upstreams,
                        forwards: Semaphore::new(FORWARDS_IN_FLIGHT),
                    });
                    tokio::select! {
                        () = serve(udp, tcp, responder) => {}
                        moved = gateways.wait_for(|g| *g != Some(gateway)) => {
                            if moved.is_err() {
                                return;
                            }
                        }
                    }
                    info!(%address, "name responder moves to the new gateway address");
                    continue;
                }
                Err(err) => {
                    // The bridge (and its address) appears with the first attachment.
                    if last_error != Some((gateway, err.kind())) {
                        if err.kind() == std::io::ErrorKind::AddrNotAvailable {
                            debug!(%address, "gateway address not there yet; binding again soon");
                        } else {
                            warn!(%address, %err, "name responder cannot listen; retrying");
                        }
                        last_error = Some((gateway, err.kind()));
                    }
                }
            }
        }
        tokio::select! {
            changed = gateways.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(BIND_RETRY), if gateway.is_some() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn names() -> Names {
        [
            (
                "web".to_owned(),
                vec!["10.88.0.2".parse().unwrap(), "10.88.1.2".parse().unwrap()],
            ),
            ("v6".to_owned(), vec!["fd00::2".parse().unwrap()]),
        ]
        .into()
    }

    fn query(name: &str, record_type: RecordType) -> Message {
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        query
    }

    fn local(reply: Reply) -> Message {
        match reply {
            Reply::Local(message) => message,
            Reply::Forward => panic!("expected a local answer"),
        }
    }

    fn addresses(message: &Message) -> Vec<String> {
        message
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => panic!("unexpected record {other:?}"),
            })
            .collect()
    }

    #[test]
    fn answers_follow_the_table() {
        let names = names();
        // (query name, type, response code, addresses)
        let cases: &[(&str, RecordType, ResponseCode, &[&str])] = &[
            (
                "web.gantry.",
                RecordType::A,
                ResponseCode::NoError,
                &["10.88.0.2", "10.88.1.2"],
            ),
            (
                "WEB.Gantry.",
                RecordType::A,
                ResponseCode::NoError,
                &["10.88.0.2", "10.88.1.2"],
            ),
            (
                "web.gantry",
                RecordType::A,
                ResponseCode::NoError,
                &["10.88.0.2", "10.88.1.2"],
            ),
            ("web.gantry.", RecordType::AAAA, ResponseCode::NoError, &[]),
            ("web.gantry.", RecordType::TXT, ResponseCode::NoError, &[]),
            (
                "v6.gantry.",
                RecordType::AAAA,
                ResponseCode::NoError,
                &["fd00::2"],
            ),
            ("v6.gantry.", RecordType::A, ResponseCode::NoError, &[]),
            ("db.gantry.", RecordType::A, ResponseCode::NXDomain, &[]),
            ("x.web.gantry.", RecordType::A, ResponseCode::NXDomain, &[]),
            ("gantry.", RecordType::A, ResponseCode::NoError, &[]),
        ];
        for (name, record_type, code, expected) in cases {
            let q = query(name, *record_type);
            let response = local(answer(&q, &names));
            let what = format!("{name} {record_type}");
            assert_eq!(response.metadata.id, q.metadata.id, "{what}");
            assert_eq!(
                response.metadata.message_type,
                MessageType::Response,
                "{what}"
            );
            assert_eq!(response.metadata.response_code, *code, "{what}");
            assert!(response.metadata.authoritative, "{what}");
            assert!(response.metadata.recursion_desired, "{what}");
            assert_eq!(addresses(&response), *expected, "{what}");
            assert!(response.answers.iter().all(|r| r.ttl == TTL_SECS), "{what}");
            // It survives the wire.
            let wire = Message::from_vec(&response.to_vec().unwrap()).unwrap();
            assert_eq!(addresses(&wire), *expected, "{what}");
        }
    }

    #[test]
    fn other_names_are_forwarded_and_bad_queries_refused() {
        let names = names();
        for name in ["example.com.", "gantry.example.", "web."] {
            assert!(
                matches!(answer(&query(name, RecordType::A), &names), Reply::Forward),
                "{name}"
            );
        }
        let mut two = query("web.gantry.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("db.gantry.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            local(answer(&two, &names)).metadata.response_code,
            ResponseCode::FormErr
        );
        let mut update = query("web.gantry.", RecordType::A);
        update.metadata.op_code = OpCode::Update;
        assert_eq!(
            local(answer(&update, &names)).metadata.response_code,
            ResponseCode::NotImp
        );
        // Garbage with an id gets FORMERR with that id; without one, nothing.
        let reply = Message::from_vec(&formerr(&[0x12, 0x34, 0xff]).unwrap()).unwrap();
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert!(formerr(&[1]).is_none());
    }

    #[test]
    fn big_answers_are_truncated_for_udp() {
        let many: Vec<IpAddr> = (0..200u8)
            .map(|n| IpAddr::V4(Ipv4Addr::new(10, 88, 0, n)))
            .collect();
        let names: Names = [("big".to_owned(), many)].into();
        let q = query("big.gantry.", RecordType::A);
        let response = local(answer(&q, &names));
        let udp = Message::from_vec(&encode_udp(&response, q.max_payload()).unwrap()).unwrap();
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        assert_eq!(
            addresses(&Message::from_vec(&response.to_vec().unwrap()).unwrap()).len(),
            200
        );
    }

    #[test]
    fn name_tables_apply_in_full_and_as_deltas() {
        let encode = |entries: &[(&str, &[&str])]| -> prost::bytes::Bytes {
            let workloads = entries
                .iter()
                .map(|(w, a)| pb::WorkloadAddresses {
                    workload: (*w).to_owned(),
                    addresses: a.iter().map(|a| (*a).to_owned()).collect(),
                })
                .collect();
            prost::Message::encode_to_vec(&pb::NameEntries { workloads }).into()
        };
        let mut names = Names::new();
        names.insert("stale".into(), vec!["10.0.0.1".parse().unwrap()]);
        apply(
            &mut names,
            pb::NameTable {
                delta: false,
                workloads: encode(&[("web", &["10.88.0.2"]), ("db", &["10.88.0.3", "bad"])]),
                removed: Vec::new(),
            },
        )
        .unwrap();
        assert_eq!(names.keys().collect::<Vec<_>>(), ["db", "web"]);
        assert_eq!(names["db"].len(), 1, "the unreadable address is left out");
        apply(
            &mut names,
            pb::NameTable {
                delta: true,
                workloads: encode(&[("web", &["10.88.0.2", "10.88.1.2"])]),
                removed: vec!["db".into()],
            },
        )
        .unwrap();
        assert_eq!(names.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(names["web"].len(), 2);
        let garbage = pb::NameTable {
            delta: false,
            workloads: prost::bytes::Bytes::from_static(&[0x0a, 0x7f]),
            removed: Vec::new(),
        };
        assert!(apply(&mut names, garbage).is_err());
        assert_eq!(names.len(), 1, "an undecodable table changes nothing");
    }

    #[test]
    fn resolv_conf_points_at_the_gateway_and_keeps_host_search_and_options() {
        let host = "# generated\nnameserver 127.0.0.53\nsearch corp.example. lab\noptions edns0 trust-ad\n";
        assert_eq!(
            resolv_conf("10.88.1.1".parse().unwrap(), host),
            "nameserver 10.88.1.1\nsearch gantry corp.example lab\noptions edns0 trust-ad\n"
        );
        assert_eq!(
            upstreams(host),
            ["127.0.0.53:53".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            upstreams("nameserver fe80::1%eth0\nnameserver 192.0.2.1\n"),
            ["192.0.2.1:53".parse::<SocketAddr>().unwrap()]
        );
    }

    /// A fake upstream resolver on loopback: answers every query with `answer_ip` for its name,
    /// after a stray datagram with the wrong id.
    async fn fake_upstream(answer_ip: Ipv4Addr) -> (SocketAddr, tokio::task::JoinHandle<usize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let (len, client) = socket.recv_from(&mut buf).await.unwrap();
            let query = Message::from_vec(&buf[..len]).unwrap();
            let mut wrong = Message::response(query.metadata.id.wrapping_add(1), OpCode::Query);
            wrong.add_queries(query.queries.iter().cloned());
            socket
                .send_to(&wrong.to_vec().unwrap(), client)
                .await
                .unwrap();
            let mut response = Message::response(query.metadata.id, OpCode::Query);
            response.add_queries(query.queries.iter().cloned());
            response.add_answer(Record::from_rdata(
                query.queries[0].name().clone(),
                60,
                RData::A(A(answer_ip)),
            ));
            socket
                .send_to(&response.to_vec().unwrap(), client)
                .await
                .unwrap();
            len
        });
        (address, task)
    }

    #[tokio::test]
    async fn other_names_are_forwarded_to_the_upstream_resolver() {
        let (upstream, task) = fake_upstream(Ipv4Addr::new(192, 0, 2, 7)).await;
        let (names_tx, names_rx) = watch::channel(names());
        let responder = Responder {
            names: names_rx,
            upstreams: vec![upstream],
            forwards: Semaphore::new(4),
        };
        let q = query("example.com.", RecordType::A);
        let bytes = q.to_vec().unwrap();
        let response = Message::from_vec(&responder.respond(&bytes, true).await.unwrap()).unwrap();
        assert_eq!(response.metadata.id, q.metadata.id);
        assert_eq!(addresses(&response), ["192.0.2.7"]);
        assert_eq!(
            task.await.unwrap(),
            bytes.len(),
            "the query went out as it came"
        );
        // Gantry's names never leave the node.
        let local = responder
            .respond(&query("web.gantry.", RecordType::A).to_vec().unwrap(), true)
            .await
            .unwrap();
        assert_eq!(addresses(&Message::from_vec(&local).unwrap()).len(), 2);
        drop(names_tx);
    }

    #[tokio::test]
    async fn a_silent_upstream_gets_servfail_within_the_timeout() {
        // Bound but never answering.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let q = query("example.com.", RecordType::A).to_vec().unwrap();
        let started = std::time::Instant::now();
        let answer = forward(
            &q,
            &[silent.local_addr().unwrap()],
            Duration::from_millis(300),
        )
        .await;
        assert!(answer.is_none());
        assert!(started.elapsed() < Duration::from_secs(2));
        let (_tx, names_rx) = watch::channel(Names::new());
        let responder = Responder {
            names: names_rx,
            upstreams: Vec::new(),
            forwards: Semaphore::new(1),
        };
        let response = Message::from_vec(&responder.respond(&q, true).await.unwrap()).unwrap();
        assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn the_responder_serves_udp_and_tcp_once_its_address_exists() {
        // 127.0.0.1 exists at once; a port of its own for the test.
        let port = {
            let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            probe.local_addr().unwrap().port()
        };
        let config = DnsConfig {
            port,
            resolv_conf: "/nonexistent".into(),
        };
        let (gateway_tx, gateway_rx) = watch::channel(None);
        let (_names_tx, names_rx) = watch::channel(names());
        let task = tokio::spawn(run(config, gateway_rx, names_rx));
        gateway_tx.send_replace(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let q = query("web.gantry.", RecordType::A);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut answered = None;
        for _ in 0..50 {
            client.send_to(&q.to_vec().unwrap(), server).await.unwrap();
            if let Ok(Ok(len)) =
                tokio::time::timeout(Duration::from_millis(100), client.recv(&mut buf)).await
            {
                answered = Some(Message::from_vec(&buf[..len]).unwrap());
                break;
            }
        }
        let answered = answered.expect("the responder answers over UDP");
        assert_eq!(addresses(&answered), ["10.88.0.2", "10.88.1.2"]);

        let mut stream = TcpStream::connect(server).await.unwrap();
        let bytes = query("db.gantry.", RecordType::A).to_vec().unwrap();
        stream.write_u16(bytes.len() as u16).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let len = stream.read_u16().await.unwrap();
        let mut reply = vec![0u8; usize::from(len)];
        stream.read_exact(&mut reply).await.unwrap();
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        task.abort();
    }
}
