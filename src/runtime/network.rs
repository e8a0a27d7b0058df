//! Which Docker network workspaces join, and where their agents reach the registry.
//!
//! By default every operator instance puts its workspaces on a bridge network of its
//! own, `molecule-<instance>` (labelled with the instance; `DockerRuntime::
//! ensure_own_network`), and serves the registry to them on that bridge's gateway, the
//! host's address on it, through a listener that answers only the agents' routes
//! (`registry::agent_router`). The admin API and metrics stay on `--listen`
//! (loopback). What this buys, with the capabilities every workspace drops:
//! - a workspace has its own network namespace, so nothing it runs can listen where
//!   the other agents send their tokens: they send them to the gateway, an address of
//!   the host that no container can take (that would need NET_ADMIN or NET_RAW), also
//!   while the operator is stopped;
//! - a workspace's 127.0.0.1 is its own: the host's loopback services (the admin API,
//!   a local database) are out of its reach;
//! - each agent has its own source address, so failed authentications are limited
//!   per agent rather than for all agents at once.
//!
//! `--network host` keeps the old arrangement as an explicit choice: agents share the
//! host's network namespace, reach its loopback, and any of them can listen on the
//! registry's port while the operator is down and collect the others' tokens.
//! `--network NAME` puts workspaces on an existing network, used as found.
//!
//! The network's name is part of every container's spec hash and the registry URL is
//! in its env: both must stay the same across restarts of the operator, or every
//! workspace would be recreated. The network outlives the operator (its gateway
//! address with it), and the agents' port is `--listen`'s.

use std::net::{IpAddr, SocketAddr};

pub const HOST: &str = "host";

/// What `--network` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkChoice {
    /// This instance's own bridge network (the default), made by the operator.
    Own(String),
    /// `--network host`: every agent in the host's network namespace.
    Host,
    /// `--network NAME`: an existing network, used as found and never removed.
    Named(String),
}

impl NetworkChoice {
    /// From `--network` (None: not given) for operator instance `instance`.
    pub fn new(flag: Option<&str>, instance: &str) -> Self {
        let own = own_network_name(instance);
        match flag {
            None => Self::Own(own),
            Some(name) if name == own => Self::Own(own),
            Some(HOST) => Self::Host,
            Some(name) => Self::Named(name.to_string()),
        }
    }

    /// The name containers are created with (`HostConfig.NetworkMode`).
    pub fn name(&self) -> &str {
        match self {
            Self::Own(name) | Self::Named(name) => name,
            Self::Host => HOST,
        }
    }
}

/// The default network of operator instance `instance`.
pub fn own_network_name(instance: &str) -> String {
    format!("molecule-{instance}")
}

/// A network as Docker describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkspaceNetwork {
    pub name: String,
    /// The host's IPv4 address on the network (its bridge's gateway), if it has one.
    pub gateway: Option<IpAddr>,
}

/// Where agents are told the registry is, and where the operator listens for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// `MOLECULE_REGISTRY_URL` in every workspace.
    pub url: String,
    /// The agents-only listener's address; None when agents use the main listener
    /// (host network) or a URL the operator was given.
    pub listen: Option<SocketAddr>,
}

/// Decides the agents' endpoint. `listening` is the address the main listener (admin
/// API, metrics) is bound to. An explicit `--registry-url` always wins (the operator
/// then serves nothing extra: whoever gave it routes it, e.g. in a cluster).
pub fn agent_endpoint(
    choice: &NetworkChoice,
    network: Option<&WorkspaceNetwork>,
    registry_url: Option<&str>,
    listening: SocketAddr,
) -> Result<AgentEndpoint, String> {
    if let Some(url) = registry_url {
        return Ok(AgentEndpoint { url: url.to_string(), listen: None });
    }
    if *choice == NetworkChoice::Host {
        return Ok(AgentEndpoint { url: format!("http://{listening}"), listen: None });
    }
    let name = choice.name();
    let Some(gateway) = network.and_then(|n| n.gateway) else {
        return Err(format!(
            "Docker network {name} has no IPv4 gateway, so its workspaces cannot reach the operator; pass \
             --registry-url URL (an address they can reach), or use a bridge network"
        ));
    };
    if listening.ip().is_unspecified() {
        return Err(format!(
            "--listen {listening} would serve the admin API and metrics on every address of the host, the \
             workspaces' network {name} included; listen on one address (the default is 127.0.0.1:8080: agents get \
             a listener of their own on {gateway}), or pass --registry-url URL"
        ));
    }
    let listen = SocketAddr::new(gateway, listening.port());
    Ok(AgentEndpoint { url: format!("http://{listen}"), listen: Some(listen) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(gateway: Option<&str>) -> WorkspaceNetwork {
        WorkspaceNetwork { name: "molecule-i".into(), gateway: gateway.map(|g| g.parse().unwrap()) }
    }

    #[test]
    fn the_default_is_the_instances_own_network_and_host_is_explicit() {
        assert_eq!(NetworkChoice::new(None, "i"), NetworkChoice::Own("molecule-i".into()));
        assert_eq!(NetworkChoice::new(Some("molecule-i"), "i"), NetworkChoice::Own("molecule-i".into()));
        assert_eq!(NetworkChoice::new(Some("host"), "i"), NetworkChoice::Host);
        assert_eq!(NetworkChoice::new(Some("lab"), "i"), NetworkChoice::Named("lab".into()));
        assert_eq!(NetworkChoice::new(None, "i").name(), "molecule-i");
        assert_eq!(NetworkChoice::Host.name(), "host");
    }

    #[test]
    fn agents_on_a_bridge_get_the_gateway_at_the_listen_port_and_nothing_else() {
        let own = NetworkChoice::new(None, "i");
        let at = agent_endpoint(&own, Some(&bridge(Some("172.18.0.1"))), None, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            at.unwrap(),
            AgentEndpoint { url: "http://172.18.0.1:8080".into(), listen: Some("172.18.0.1:8080".parse().unwrap()) }
        );
        let host = agent_endpoint(&NetworkChoice::Host, None, None, "127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(host, AgentEndpoint { url: "http://127.0.0.1:9".into(), listen: None });
        let given = agent_endpoint(&own, None, Some("http://r:1"), "0.0.0.0:8080".parse().unwrap()).unwrap();
        assert_eq!(given, AgentEndpoint { url: "http://r:1".into(), listen: None });
    }

    #[test]
    fn no_gateway_or_an_all_addresses_listener_is_an_error_that_says_what_to_do() {
        let own = NetworkChoice::new(None, "i");
        let e = agent_endpoint(&own, Some(&bridge(None)), None, "127.0.0.1:8080".parse().unwrap()).unwrap_err();
        assert!(e.contains("no IPv4 gateway") && e.contains("--registry-url"), "{e}");
        let gw = bridge(Some("172.18.0.1"));
        let e = agent_endpoint(&own, Some(&gw), None, "0.0.0.0:8080".parse().unwrap()).unwrap_err();
        assert!(e.contains("every address") && e.contains("--registry-url"), "{e}");
    }
}
