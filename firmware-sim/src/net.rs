//! Where device connections come from: the loopback source addresses a fleet is spread
//! over (`--source-addrs`, or chosen automatically when one address's ephemeral ports
//! cannot hold the fleet) and the bind-before-connect that uses them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

/// Largest number of source addresses a range may name: far more than any fleet needs,
/// small enough that a typo (`127.0.0.2-127.2.0.9`) is refused rather than expanded.
const MAX_SOURCES: u32 = 4096;

/// Parses `127.0.0.2-127.0.0.9` (an inclusive IPv4 range), `10.0.0.1,10.0.0.2` (a
/// list), or a single address.
pub fn parse_source_addrs(text: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((first, last)) = part.split_once('-') {
            let parse = |s: &str| {
                s.trim()
                    .parse::<Ipv4Addr>()
                    .map_err(|_| format!("{s:?} in {part:?} is not an IPv4 address"))
            };
            let (first, last) = (u32::from(parse(first)?), u32::from(parse(last)?));
            if last < first {
                return Err(format!("{part:?}: the range runs backwards"));
            }
            if last - first >= MAX_SOURCES {
                return Err(format!("{part:?} names more than {MAX_SOURCES} addresses"));
            }
            out.extend((first..=last).map(|a| IpAddr::V4(Ipv4Addr::from(a))));
        } else {
            out.push(
                part.parse::<IpAddr>()
                    .map_err(|_| format!("{part:?} is not an IP address"))?,
            );
        }
    }
    if out.is_empty() {
        return Err("no source address given".into());
    }
    Ok(out)
}

/// How many ephemeral ports one source address offers towards one destination
/// (`/proc/sys/net/ipv4/ip_local_port_range`; Linux's default range when unreadable).
pub fn ephemeral_ports() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(|n| n.parse::<u32>().ok());
            let (low, high) = (it.next()??, it.next()??);
            high.checked_sub(low).map(|n| n + 1)
        })
        .unwrap_or(60_999 - 32_768 + 1)
}

/// The source addresses for `connections` simultaneous (or, with TIME_WAIT, recent)
/// connections to `target`: the explicit list, else — for a loopback IPv4 target
/// that needs more ports than one address has, with a margin of a quarter for
/// sockets in TIME_WAIT and everything else on the machine — 127.0.0.1 onwards, as
/// many as it takes. `None`: let the kernel choose, as a plain connect does.
pub fn sources(
    explicit: Option<&[IpAddr]>,
    target: SocketAddr,
    connections: u64,
) -> Option<Vec<IpAddr>> {
    if let Some(list) = explicit {
        return Some(list.to_vec());
    }
    let usable = u64::from(ephemeral_ports()) * 3 / 4;
    match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() && connections > usable => {
            let count = connections
                .div_ceil(usable.max(1))
                .min(u64::from(MAX_SOURCES));
            Some(
                (0..count as u32)
                    .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + i)))
                    .collect(),
            )
        }
        _ => None,
    }
}

/// Connects to `addr`, from `bind` when given. The socket is bound with
/// IP_BIND_ADDRESS_NO_PORT so the port is picked at connect time per destination (a
/// plain bind to port 0 would reserve a port for every destination and halve what
/// one address can hold).
pub async fn connect(addr: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(bind) = bind else {
        return TcpStream::connect(addr).await;
    };
    let socket = match bind {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if bind.is_ipv4() {
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .map_err(std::io::Error::from)?;
    }
    socket.bind(SocketAddr::new(bind, 0))?;
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_lists_and_single_addresses_parse() {
        let range = parse_source_addrs("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(range.len(), 3);
        assert_eq!(range[2], "127.0.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(parse_source_addrs("127.0.0.1, 127.0.0.9").unwrap().len(), 2);
        assert!(parse_source_addrs("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_addrs("127.0.0.1-127.1.0.0").is_err());
        assert!(parse_source_addrs("nonsense").is_err());
        assert!(parse_source_addrs("").is_err());
    }

    #[test]
    fn loopback_fleets_beyond_one_address_get_more() {
        let target: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        assert_eq!(sources(None, target, 100), None);
        let usable = u64::from(ephemeral_ports()) * 3 / 4;
        let many = sources(None, target, usable * 2 + 1).unwrap();
        assert_eq!(many.len(), 3);
        assert_eq!(many[0], "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(many[2], "127.0.0.3".parse::<IpAddr>().unwrap());
        let remote: SocketAddr = "10.1.2.3:1883".parse().unwrap();
        assert_eq!(sources(None, remote, usable * 2), None);
        let given = ["127.0.0.5".parse().unwrap()];
        assert_eq!(sources(Some(&given), target, 1).unwrap(), given.to_vec());
    }

    #[tokio::test]
    async fn a_bound_connect_comes_from_the_source_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: IpAddr = "127.0.0.3".parse().unwrap();
        let (stream, accepted) = tokio::join!(connect(addr, Some(source)), listener.accept());
        assert_eq!(stream.unwrap().local_addr().unwrap().ip(), source);
        assert_eq!(accepted.unwrap().1.ip(), source);
    }
}
