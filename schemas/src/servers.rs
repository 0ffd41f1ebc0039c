//! The NATS server list every service and the SDK accept: one URL, or
//! several separated by commas (`nats://n1:4222,nats://n2:4222`), the nodes
//! of one cluster. The client connects to the first that answers, in the
//! order given, and reconnects to the others when its node goes away.

use async_nats::ServerAddr;

/// The servers in `list` (comma-separated URLs; blanks around each are
/// ignored), in the order given.
///
/// # Errors
/// A URL that does not parse (the client's own message), or an empty list.
pub fn server_addrs(list: &str) -> std::io::Result<Vec<ServerAddr>> {
    let addrs = list
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::parse::<ServerAddr>)
        .collect::<std::io::Result<Vec<_>>>()?;
    if addrs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("no NATS server URL in `{list}`"),
        ));
    }
    Ok(addrs)
}

/// A server list as the client's address argument: `connect(ServerList(url))`
/// accepts one URL or several separated by commas, where the client alone
/// takes one.
#[derive(Debug, Clone, Copy)]
pub struct ServerList<'a>(pub &'a str);

impl async_nats::ToServerAddrs for ServerList<'_> {
    type Iter = std::vec::IntoIter<ServerAddr>;

    fn to_server_addrs(&self) -> std::io::Result<Self::Iter> {
        server_addrs(self.0).map(Vec::into_iter)
    }
}

/// Connects with `options` to the servers in `list` (see [`server_addrs`]),
/// trying them in the order given (the client would otherwise shuffle
/// them, so replicas given lists in different orders land on different
/// nodes) and reconnecting to the others, and to the nodes the cluster
/// announces, when its node goes away.
///
/// # Errors
/// The client's: a list that does not parse, or no server answering.
pub async fn connect(
    options: async_nats::ConnectOptions,
    list: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    options
        .retain_servers_order()
        .connect(ServerList(list))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_or_several_in_order() {
        let one = server_addrs("nats://127.0.0.1:4222").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].port(), 4222);
        let three = server_addrs("nats://a:4001, nats://b:4002,c:4003").unwrap();
        let ports: Vec<u16> = three.iter().map(ServerAddr::port).collect();
        assert_eq!(ports, [4001, 4002, 4003]);
        assert_eq!(three[2].host(), "c");
        assert!(server_addrs("").is_err());
        assert!(server_addrs(" , ").is_err());
        assert!(server_addrs("nats://a:4222,http://[bad").is_err());
    }
}
