//! Link addresses and CBS audiences: what a client attaches to
//! (`/messages/devicebound`, `NAME/ConsumerGroups/CG/Partitions/N`, `$cbs`, …), with
//! an optional `amqps://host[:port]` or `sb://host` prefix, and the resource path
//! (`HOST/…`) a claim must cover for it.

/// What an attach addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// `$cbs`: put-token requests (a receiver here) and their replies (a sender).
    Cbs,
    /// `$management` or `NAME/$management`: Event Hubs READ requests and replies.
    Management,
    /// `/messages/devicebound`: C2D sends.
    DeviceBound,
    /// `/messages/serviceBound/feedback`.
    Feedback,
    /// `/messages/serviceBound/filenotifications` (or `fileuploadnotifications`).
    FileNotifications,
    /// `NAME/ConsumerGroups/CG/Partitions/N`.
    Partition {
        /// The consumer group as given.
        group: String,
        /// The partition.
        partition: u32,
    },
}

/// Most bytes of an address considered (longer ones are refused as unknown).
pub const MAX_ADDRESS_BYTES: usize = 1024;

/// Removes `amqps://host[:port]`, `amqp://…`, `sb://…` prefixes and surrounding `/`.
pub fn strip_scheme(address: &str) -> &str {
    let lower_starts = |prefix: &str| {
        address
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    for scheme in ["amqps://", "amqp://", "sb://"] {
        if lower_starts(scheme) {
            let rest = &address[scheme.len()..];
            return match rest.find('/') {
                Some(slash) => rest[slash..].trim_matches('/'),
                None => "",
            };
        }
    }
    address.trim_matches('/')
}

/// Parses an attach address for the Event Hub-compatible entity `entity`.
pub fn parse(address: &str, entity: &str) -> Option<Node> {
    if address.len() > MAX_ADDRESS_BYTES {
        return None;
    }
    let path = strip_scheme(address);
    let lower = path.to_ascii_lowercase();
    match lower.as_str() {
        "$cbs" => return Some(Node::Cbs),
        "$management" => return Some(Node::Management),
        "messages/devicebound" => return Some(Node::DeviceBound),
        "messages/servicebound/feedback" => return Some(Node::Feedback),
        "messages/servicebound/filenotifications"
        | "messages/servicebound/fileuploadnotifications" => {
            return Some(Node::FileNotifications);
        }
        _ => {}
    }
    let mut parts = path.split('/');
    let name = parts.next()?;
    if !name.eq_ignore_ascii_case(entity) {
        return None;
    }
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some(m), None, None, None, None) if m.eq_ignore_ascii_case("$management") => {
            Some(Node::Management)
        }
        (Some(cg), Some(group), Some(p), Some(partition), None)
            if cg.eq_ignore_ascii_case("consumergroups")
                && p.eq_ignore_ascii_case("partitions")
                && valid_group(group) =>
        {
            // Only plain decimal digits: `+1` or ` 1` are not partition ids.
            if partition.is_empty() || !partition.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(Node::Partition {
                group: group.to_string(),
                partition: partition.parse().ok()?,
            })
        }
        _ => None,
    }
}

/// Consumer group names: Event Hubs' rules (1–50 letters, digits, `.`, `_`, `-`,
/// `$` for `$Default`).
fn valid_group(group: &str) -> bool {
    (1..=50).contains(&group.len())
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'$'))
}

/// An audience or resource as `host/path…`: scheme and port removed, the host
/// lower-cased, no surrounding `/`.
pub fn normalize(resource: &str) -> String {
    let without_scheme = ["amqps://", "amqp://", "sb://", "https://"]
        .iter()
        .find_map(|scheme| {
            resource
                .get(..scheme.len())
                .filter(|head| head.eq_ignore_ascii_case(scheme))
                .map(|_| &resource[scheme.len()..])
        })
        .unwrap_or(resource)
        .trim_matches('/');
    let (host, path) = without_scheme
        .split_once('/')
        .unwrap_or((without_scheme, ""));
    // `host:port` (an IPv6 literal in brackets keeps its colons).
    let host = match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let host = host.to_ascii_lowercase();
    let path = path.trim_matches('/');
    if path.is_empty() {
        host
    } else {
        format!("{host}/{path}")
    }
}

/// Whether `scope` (normalized) covers `resource` (normalized): equal, or a prefix
/// ending at a `/`, compared case-insensitively.
pub fn covers(scope: &str, resource: &str) -> bool {
    let (scope, resource) = (scope.to_ascii_lowercase(), resource.to_ascii_lowercase());
    resource == scope
        || resource
            .strip_prefix(&scope)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The resource path (normalized) an attach to `node` needs a claim for.
pub fn resource_of(node: &Node, hostname: &str, entity: &str) -> String {
    let host = hostname.to_ascii_lowercase();
    match node {
        Node::Cbs => format!("{host}/$cbs"),
        Node::Management => format!("{host}/{entity}/$management"),
        Node::DeviceBound => format!("{host}/messages/devicebound"),
        Node::Feedback => format!("{host}/messages/servicebound/feedback"),
        Node::FileNotifications => format!("{host}/messages/servicebound/filenotifications"),
        Node::Partition { group, partition } => {
            format!("{host}/{entity}/consumergroups/{group}/partitions/{partition}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn azure_addresses_parse() {
        assert_eq!(parse("$cbs", "hub"), Some(Node::Cbs));
        assert_eq!(
            parse("/messages/devicebound", "hub"),
            Some(Node::DeviceBound)
        );
        assert_eq!(
            parse("/messages/serviceBound/feedback", "hub"),
            Some(Node::Feedback)
        );
        assert_eq!(
            parse("/messages/servicebound/fileuploadnotifications", "hub"),
            Some(Node::FileNotifications)
        );
        assert_eq!(parse("hub/$management", "hub"), Some(Node::Management));
        assert_eq!(
            parse(
                "amqps://h.example:5671/HUB/ConsumerGroups/$Default/Partitions/3",
                "hub"
            ),
            Some(Node::Partition {
                group: "$Default".into(),
                partition: 3
            })
        );
        assert_eq!(
            parse("other/ConsumerGroups/$Default/Partitions/3", "hub"),
            None
        );
        assert_eq!(
            parse("hub/ConsumerGroups/$Default/Partitions/+3", "hub"),
            None
        );
        assert_eq!(parse("hub/ConsumerGroups/a b/Partitions/3", "hub"), None);
        assert_eq!(parse("/devices/x/messages/events", "hub"), None);
    }

    #[test]
    fn audiences_normalize_and_cover() {
        assert_eq!(normalize("sb://Host.Example:5671/hub/"), "host.example/hub");
        assert_eq!(normalize("127.0.0.5"), "127.0.0.5");
        assert_eq!(normalize("amqps://127.0.0.5:5671"), "127.0.0.5");
        assert!(covers("host", "host/messages/devicebound"));
        assert!(covers(
            "host/hub",
            "host/hub/consumergroups/$default/partitions/0"
        ));
        assert!(!covers("host/hu", "host/hub/$management"));
        assert!(!covers("host/hub/$management", "host/hub"));
    }

    proptest! {
        #[test]
        fn parsing_any_address_never_panics(address in ".{0,200}", entity in "[a-z]{1,8}") {
            let _ = parse(&address, &entity);
            let _ = normalize(&address);
        }

        #[test]
        fn a_scope_covers_what_lies_under_it(scope in "[a-z]{1,8}(/[a-z0-9$]{1,8}){0,3}",
                                             rest in "(/[a-z0-9]{1,8}){0,3}") {
            let resource = format!("{scope}{rest}");
            prop_assert!(covers(&scope, &resource));
            let longer = format!("{scope}x");
            prop_assert!(!covers(&longer, &resource));
        }
    }
}
