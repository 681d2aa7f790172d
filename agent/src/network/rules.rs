//! The node-wide packet filter rules of Gantry's default network: one masquerade for the node
//! subnet's traffic leaving it, and one FORWARD admission for the subnet, written once per
//! subnet rather than per container.
//!
//! The bridge plugin's `ipMasq` and the firewall plugin do the same per container: a chain of
//! its own per address, written on every ADD and removed on every DEL, each an `iptables` run
//! of 10–40 ms under the xtables lock. On this kind of machine they made up two thirds of an
//! attach (bridge with `ipMasq` 73 ms, firewall 40 ms, against 38 ms for the bridge alone) and
//! serialised every start and stop on the node. Docker, too, writes one MASQUERADE per bridge
//! network. The matches are the plugins' own, aggregated over the subnet:
//!
//! ```text
//! nat    POSTROUTING → GANTRY-NAT-<bridge>:  ! -s SUBNET → RETURN; -d SUBNET → RETURN;
//!                                             -d 224.0.0.0/4 (ff00::/8) → RETURN; MASQUERADE
//! filter FORWARD (first) → GANTRY-FWD-<bridge>:  -s SUBNET → ACCEPT;
//!                                             -d SUBNET, RELATED/ESTABLISHED → ACCEPT
//! ```
//!
//! The chains are named after the bridge, so agents sharing a network namespace (each with its
//! own bridge) keep apart. [`install`] is idempotent and atomic per table (`iptables-restore
//! --noflush` replaces the chain's rules in one transaction); a subnet change rewrites them.
//! The rules outlive the agent, as Docker's do: containers keep running across agent restarts
//! and keep their connectivity. [`remove`] takes them away.

use std::io;
use std::process::Stdio;

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// What went wrong writing or removing the rules.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The bridge name cannot name a chain (chain names are at most 28 characters).
    #[error(
        "bridge name {0:?} is too long to name the node's iptables chains (15 characters at most)"
    )]
    BridgeName(String),
    /// A command could not be run.
    #[error("cannot run {command}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A command failed.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// The nat chain of `bridge`.
pub fn nat_chain(bridge: &str) -> String {
    format!("GANTRY-NAT-{bridge}")
}

/// The filter chain of `bridge`.
pub fn forward_chain(bridge: &str) -> String {
    format!("GANTRY-FWD-{bridge}")
}

fn check_bridge(bridge: &str) -> Result<(), RulesError> {
    let ok = !bridge.is_empty()
        && bridge.len() <= 15
        && bridge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(RulesError::BridgeName(bridge.into()))
    }
}

/// The `iptables-restore --noflush` input that (re)writes both chains for `subnet`. Declaring
/// a chain that exists empties it, so the chains end up with exactly these rules.
pub fn restore_input(bridge: &str, subnet: IpNet) -> String {
    let subnet = subnet.trunc();
    let multicast = match subnet {
        IpNet::V4(_) => "224.0.0.0/4",
        IpNet::V6(_) => "ff00::/8",
    };
    let nat = nat_chain(bridge);
    let fwd = forward_chain(bridge);
    let comment = format!("\"gantry: containers of {bridge}\"");
    format!(
        "*nat\n\
         :{nat} - [0:0]\n\
         -A {nat} ! -s {subnet} -j RETURN\n\
         -A {nat} -d {subnet} -j RETURN\n\
         -A {nat} -d {multicast} -j RETURN\n\
         -A {nat} -m comment --comment {comment} -j MASQUERADE\n\
         COMMIT\n\
         *filter\n\
         :{fwd} - [0:0]\n\
         -A {fwd} -s {subnet} -m comment --comment {comment} -j ACCEPT\n\
         -A {fwd} -d {subnet} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment {comment} -j ACCEPT\n\
         COMMIT\n"
    )
}

fn tools(subnet_is_v6: bool) -> (&'static str, &'static str) {
    if subnet_is_v6 {
        ("ip6tables", "ip6tables-restore")
    } else {
        ("iptables", "iptables-restore")
    }
}

/// Writes the rules of `bridge` for `subnet` (replacing those of an earlier subnet) and makes
/// sure POSTROUTING and FORWARD jump to them.
pub async fn install(bridge: &str, subnet: IpNet) -> Result<(), RulesError> {
    check_bridge(bridge)?;
    let (iptables, restore) = tools(matches!(subnet, IpNet::V6(_)));
    run(
        restore,
        &["-w", "--noflush"],
        Some(restore_input(bridge, subnet)),
    )
    .await?;
    for (table, parent, chain, first) in [
        ("nat", "POSTROUTING", nat_chain(bridge), false),
        ("filter", "FORWARD", forward_chain(bridge), true),
    ] {
        let rule = ["-j", chain.as_str()];
        let exists = run(
            iptables,
            &[&["-w", "-t", table, "-C", parent][..], &rule].concat(),
            None,
        )
        .await
        .is_ok();
        if !exists {
            let add: &[&str] = if first {
                &["-w", "-t", table, "-I", parent, "1"]
            } else {
                &["-w", "-t", table, "-A", parent]
            };
            run(iptables, &[add, &rule].concat(), None).await?;
        }
    }
    Ok(())
}

/// Removes the rules of `bridge` (both families); rules already gone are not an error.
pub async fn remove(bridge: &str) -> Result<(), RulesError> {
    check_bridge(bridge)?;
    for v6 in [false, true] {
        let (iptables, _) = tools(v6);
        for (table, parent, chain) in [
            ("nat", "POSTROUTING", nat_chain(bridge)),
            ("filter", "FORWARD", forward_chain(bridge)),
        ] {
            // Every jump (a crash between check and insert could have left two).
            while run(
                iptables,
                &["-w", "-t", table, "-D", parent, "-j", &chain],
                None,
            )
            .await
            .is_ok()
            {}
            let _ = run(iptables, &["-w", "-t", table, "-F", &chain], None).await;
            let _ = run(iptables, &["-w", "-t", table, "-X", &chain], None).await;
        }
    }
    Ok(())
}

async fn run(program: &str, args: &[&str], stdin: Option<String>) -> Result<(), RulesError> {
    let command = format!("{program} {}", args.join(" "));
    let spawn_err = |source| RulesError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await.map_err(spawn_err)?;
    }
    let output = child.wait_with_output().await.map_err(spawn_err)?;
    if output.status.success() {
        return Ok(());
    }
    Err(RulesError::Failed {
        command,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_name_the_bridge_and_the_subnet() {
        let input = restore_input("gantry0", "10.88.3.7/24".parse().unwrap());
        assert!(input.contains(":GANTRY-NAT-gantry0 - [0:0]"), "{input}");
        assert!(input.contains("-A GANTRY-NAT-gantry0 ! -s 10.88.3.0/24 -j RETURN"));
        assert!(input.contains("-d 224.0.0.0/4 -j RETURN"));
        assert!(input.contains("-j MASQUERADE"));
        assert!(input.contains("-A GANTRY-FWD-gantry0 -s 10.88.3.0/24"));
        assert_eq!(input.matches("COMMIT").count(), 2);
        let v6 = restore_input("br", "fd00:1::/64".parse().unwrap());
        assert!(v6.contains("-d ff00::/8 -j RETURN"), "{v6}");
    }

    #[test]
    fn bridge_names_must_fit_a_chain_name() {
        assert!(check_bridge("gantry0").is_ok());
        assert!(check_bridge("abcdefghijklmnop").is_err());
        assert!(check_bridge("a b").is_err());
        assert!(check_bridge("").is_err());
    }
}
