//! The device topic contract (DESIGN section 2): parsing what a device publishes and
//! subscribes to, formatting what the hub publishes, and URL-encoded property bags.
//! Every parse takes the connection's own device id; another id is not a match.

use percent_encoding::utf8_percent_encode;

use crate::delivery::Subscription;
use crate::properties::{BAG_ESCAPE, PropertyBag};

/// What a device's PUBLISH topic means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePublish {
    /// Telemetry with its property bag.
    Telemetry(PropertyBag),
    /// `$iothub/twin/GET/?$rid=…`.
    TwinGet {
        /// Request id to echo.
        rid: String,
    },
    /// `$iothub/twin/PATCH/properties/reported/?$rid=…`.
    TwinPatchReported {
        /// Request id to echo.
        rid: String,
    },
    /// `$iothub/methods/res/{status}/?$rid=…`.
    MethodResponse {
        /// The device's status code.
        status: i32,
        /// The request id of the method call.
        rid: String,
    },
}

/// Why a PUBLISH topic is refused (the connection is closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not a topic of this device's contract (another device's, or unknown).
    #[error("topic outside this device's contract")]
    NotAllowed,
    /// A contract topic with a malformed property bag or request id.
    #[error("malformed topic: {0}")]
    Malformed(&'static str),
}

/// Parses a PUBLISH topic from the connection of `device_id`.
pub fn parse_publish(topic: &str, device_id: &str) -> Result<DevicePublish, TopicError> {
    if let Some(rest) = topic.strip_prefix("devices/") {
        let rest = rest.strip_prefix(device_id).ok_or(TopicError::NotAllowed)?;
        let rest = rest
            .strip_prefix("/messages/events")
            .ok_or(TopicError::NotAllowed)?;
        let bag = match rest {
            "" | "/" => PropertyBag::default(),
            _ => {
                let raw = rest.strip_prefix('/').ok_or(TopicError::NotAllowed)?;
                PropertyBag::parse(raw).map_err(|_| TopicError::Malformed("property bag"))?
            }
        };
        return Ok(DevicePublish::Telemetry(bag));
    }
    if let Some(query) = topic.strip_prefix("$iothub/twin/GET/") {
        return Ok(DevicePublish::TwinGet {
            rid: request_id(query)?,
        });
    }
    if let Some(query) = topic.strip_prefix("$iothub/twin/PATCH/properties/reported/") {
        return Ok(DevicePublish::TwinPatchReported {
            rid: request_id(query)?,
        });
    }
    if let Some(rest) = topic.strip_prefix("$iothub/methods/res/") {
        let (status, query) = rest
            .split_once('/')
            .ok_or(TopicError::Malformed("method response"))?;
        let status = status
            .parse()
            .map_err(|_| TopicError::Malformed("method status"))?;
        return Ok(DevicePublish::MethodResponse {
            status,
            rid: request_id(query)?,
        });
    }
    Err(TopicError::NotAllowed)
}

fn request_id(query: &str) -> Result<String, TopicError> {
    let bag = PropertyBag::parse(query).map_err(|_| TopicError::Malformed("query"))?;
    match bag.get("$rid") {
        Some(rid) if !rid.is_empty() => Ok(rid.to_string()),
        _ => Err(TopicError::Malformed("missing $rid")),
    }
}

/// Parses a SUBSCRIBE filter from the connection of `device_id`; `None` for anything
/// outside the contract (wildcards across devices, other devices' topics, …).
///
/// Azure's Embedded C SDK (and the FreeRTOS, ESP32 and NetX samples on it) subscribes
/// `devices/+/messages/devicebound/#`. Azure grants it as the device's own C2D topic,
/// and so does the hub: the subscription is the same [`Subscription::CloudToDevice`],
/// and deliveries go only to the authenticated device's topic, never another's.
pub fn parse_subscription(filter: &str, device_id: &str) -> Option<Subscription> {
    match filter {
        "$iothub/twin/res/#" => Some(Subscription::TwinResponses),
        "$iothub/twin/PATCH/properties/desired/#" => Some(Subscription::DesiredPatches),
        "$iothub/methods/POST/#" => Some(Subscription::Methods),
        "devices/+/messages/devicebound/#" => Some(Subscription::CloudToDevice),
        _ => {
            let rest = filter.strip_prefix("devices/")?.strip_prefix(device_id)?;
            (rest == "/messages/devicebound/#").then_some(Subscription::CloudToDevice)
        }
    }
}

/// The longest model id stamped on telemetry. DTDL caps a DTMI at 2048 characters;
/// the bound also keeps the stamp inside the record overhead the telemetry size limit
/// leaves for the hub's own properties.
pub const MAX_MODEL_ID_LEN: usize = 2048;

/// The Plug and Play model id in a CONNECT username's query
/// (`<host>/<id>/?api-version=…&model-id=dtmi:com:example:Thermostat;1`; older SDKs
/// omit the `?`). `None` when absent, or when it is not a DTMI (`dtmi:` followed by
/// letters, digits, `_`, `:` and `;`, at most [`MAX_MODEL_ID_LEN`] characters): the
/// connection is still accepted, as the model id is a description, not a credential.
pub fn connect_model_id(username: &str) -> Option<String> {
    // `<host>/<id>/<query>`: the query is everything after the second `/`.
    let mut parts = username.splitn(3, '/');
    let query = parts.nth(2)?;
    let bag = PropertyBag::parse(query).ok()?;
    let model_id = bag.get("model-id")?;
    let is_dtmi = model_id.len() <= MAX_MODEL_ID_LEN
        && model_id.starts_with("dtmi:")
        && model_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b';'));
    is_dtmi.then(|| model_id.to_string())
}

/// `devices/{id}/messages/devicebound/{bag}`.
pub fn cloud_to_device(device_id: &str, bag: &PropertyBag) -> String {
    format!("devices/{device_id}/messages/devicebound/{}", bag.encode())
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`.
pub fn twin_response(status: u16, rid: &str, version: Option<u64>) -> String {
    let rid = utf8_percent_encode(rid, BAG_ESCAPE);
    match version {
        Some(version) => format!("$iothub/twin/res/{status}/?$rid={rid}&$version={version}"),
        None => format!("$iothub/twin/res/{status}/?$rid={rid}"),
    }
}

/// `$iothub/twin/PATCH/properties/desired/?$version={n}`.
pub fn desired_patch(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// `$iothub/methods/POST/{method}/?$rid={rid}`, the method name raw as Azure sends it:
/// the Node, C and Embedded C SDKs match the topic segment against the name they
/// registered without decoding, so a Plug and Play command `thermostat1*getMaxMinReport`
/// must arrive as written. The REST API admits only names of 1–256 characters
/// without `/`, `#` or `+`, so the raw name cannot break the topic's structure.
pub fn method_request(method: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{method}/?$rid={rid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_topics_with_and_without_bags() {
        assert_eq!(
            parse_publish("devices/d1/messages/events/", "d1"),
            Ok(DevicePublish::Telemetry(PropertyBag::default()))
        );
        assert_eq!(
            parse_publish("devices/d1/messages/events", "d1"),
            Ok(DevicePublish::Telemetry(PropertyBag::default()))
        );
        let parsed = parse_publish(
            "devices/d1/messages/events/%24.mid=m1&%24.ct=application%2Fjson&temp=hot&flag",
            "d1",
        )
        .unwrap();
        let DevicePublish::Telemetry(bag) = parsed else {
            panic!()
        };
        assert_eq!(bag.get("$.mid"), Some("m1"));
        assert_eq!(bag.get("$.ct"), Some("application/json"));
        assert_eq!(bag.get("temp"), Some("hot"));
        assert_eq!(bag.get("flag"), Some(""));
        let leading = parse_publish("devices/d1/messages/events/?a=1", "d1").unwrap();
        assert_eq!(
            leading,
            DevicePublish::Telemetry(PropertyBag(vec![("a".into(), "1".into())]))
        );
    }

    #[test]
    fn other_devices_and_unknown_topics_are_not_allowed() {
        for topic in [
            "devices/d2/messages/events/",
            "devices/d1x/messages/events/",
            "devices/d/messages/events/",
            "devices/d1/messages/devicebound/",
            "devices/d1/messages/eventsx",
            "$iothub/twin/PATCH/properties/desired/?$rid=1",
            "anything",
            "",
        ] {
            assert_eq!(
                parse_publish(topic, "d1"),
                Err(TopicError::NotAllowed),
                "{topic}"
            );
        }
        assert!(matches!(
            parse_publish("devices/d1/messages/events/%ff=1", "d1"),
            Err(TopicError::Malformed(_))
        ));
    }

    #[test]
    fn twin_and_method_topics() {
        assert_eq!(
            parse_publish("$iothub/twin/GET/?$rid=42", "d"),
            Ok(DevicePublish::TwinGet { rid: "42".into() })
        );
        assert_eq!(
            parse_publish(
                "$iothub/twin/PATCH/properties/reported/?$rid=7&$version=3",
                "d"
            ),
            Ok(DevicePublish::TwinPatchReported { rid: "7".into() })
        );
        assert_eq!(
            parse_publish("$iothub/methods/res/200/?$rid=abc", "d"),
            Ok(DevicePublish::MethodResponse {
                status: 200,
                rid: "abc".into()
            })
        );
        assert!(matches!(
            parse_publish("$iothub/twin/GET/", "d"),
            Err(TopicError::Malformed(_))
        ));
        assert!(matches!(
            parse_publish("$iothub/methods/res/ok/?$rid=1", "d"),
            Err(TopicError::Malformed(_))
        ));
    }

    #[test]
    fn subscriptions_outside_the_contract_are_refused() {
        assert_eq!(
            parse_subscription("devices/d1/messages/devicebound/#", "d1"),
            Some(Subscription::CloudToDevice)
        );
        assert_eq!(
            parse_subscription("$iothub/twin/res/#", "d1"),
            Some(Subscription::TwinResponses)
        );
        assert_eq!(
            parse_subscription("$iothub/methods/POST/#", "d1"),
            Some(Subscription::Methods)
        );
        assert_eq!(
            parse_subscription("$iothub/twin/PATCH/properties/desired/#", "d1"),
            Some(Subscription::DesiredPatches)
        );
        for filter in [
            "#",
            "+/#",
            "devices/#",
            "devices/+/messages/devicebound/+",
            "devices/+/messages/#",
            "devices/+/+/devicebound/#",
            "devices/+/messages/events/",
            "devices/d2/messages/devicebound/#",
            "devices/d1/messages/events/",
            "devices/d1/#",
            "$iothub/#",
            "$iothub/twin/#",
        ] {
            assert_eq!(parse_subscription(filter, "d1"), None, "{filter}");
        }
    }

    #[test]
    fn model_ids_come_from_the_connect_usernames_query() {
        assert_eq!(
            connect_model_id(
                "hub/d1/?api-version=2020-09-30&model-id=dtmi:com:example:Thermostat;1&DeviceClientType=x%2F1"
            ),
            Some("dtmi:com:example:Thermostat;1".into())
        );
        // Older SDKs omit the `?`; the Python SDK percent-encodes the value.
        assert_eq!(
            connect_model_id("hub/d1/api-version=2020-09-30&model-id=dtmi%3Acom%3Aa%3Bb;2"),
            Some("dtmi:com:a;b;2".into())
        );
        for username in [
            "hub/d1/?api-version=2020-09-30",
            "hub/d1",
            "d1",
            "hub/d1/?model-id=not-a-dtmi",
            "hub/d1/?model-id=dtmi:a%26b",
            "hub/d1/?model-id=dtmi:%ff",
        ] {
            assert_eq!(connect_model_id(username), None, "{username}");
        }
        let long = format!("hub/d1/?model-id=dtmi:{}", "a".repeat(MAX_MODEL_ID_LEN));
        assert_eq!(connect_model_id(&long), None);
    }

    #[test]
    fn the_embedded_c_sdk_wildcard_means_the_devices_own_c2d() {
        // Granted as the same subscription as the device's own topic; deliveries are
        // formatted from the connection's id, so `+` never widens what it receives.
        assert_eq!(
            parse_subscription("devices/+/messages/devicebound/#", "d1"),
            Some(Subscription::CloudToDevice)
        );
        assert_eq!(
            parse_subscription("devices/+/messages/devicebound/#", "d2"),
            Some(Subscription::CloudToDevice)
        );
    }

    #[test]
    fn formatted_bags_escape_slashes_and_round_trip() {
        let bag = PropertyBag(vec![
            ("$.mid".into(), "m/1".into()),
            ("$.to".into(), "/devices/d1/messages/deviceBound".into()),
            ("app key".into(), "a&b=c".into()),
        ]);
        let topic = cloud_to_device("d1", &bag);
        let encoded = topic
            .strip_prefix("devices/d1/messages/devicebound/")
            .unwrap();
        assert!(!encoded.contains('/'), "{encoded}");
        // Byte for byte as Azure writes it (the Embedded C SDK matches `%24.` keys).
        assert_eq!(
            encoded,
            "%24.mid=m%2F1&%24.to=%2Fdevices%2Fd1%2Fmessages%2FdeviceBound&app%20key=a%26b%3Dc"
        );
        assert_eq!(PropertyBag::parse(encoded).unwrap(), bag);
        assert_eq!(
            twin_response(204, "5", Some(9)),
            "$iothub/twin/res/204/?$rid=5&$version=9"
        );
        assert_eq!(
            desired_patch(4),
            "$iothub/twin/PATCH/properties/desired/?$version=4"
        );
        assert_eq!(
            method_request("reboot", "1"),
            "$iothub/methods/POST/reboot/?$rid=1"
        );
    }

    #[test]
    fn plug_and_play_component_commands_are_sent_raw() {
        assert_eq!(
            method_request("thermostat1*getMaxMinReport", "7"),
            "$iothub/methods/POST/thermostat1*getMaxMinReport/?$rid=7"
        );
        assert_eq!(
            method_request("set value:1", "8"),
            "$iothub/methods/POST/set value:1/?$rid=8"
        );
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests of the topic contract: property bags round-trip through their
    //! encoding, and no topic string panics the parsers or reaches another device.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn property_bags_round_trip(pairs in prop::collection::vec(("[ -~]{1,12}", "[ -~é/&=%]{0,12}"), 0..6)) {
            let bag = PropertyBag(pairs);
            let encoded = bag.encode();
            prop_assert!(!encoded.contains('/'));
            prop_assert_eq!(PropertyBag::parse(&encoded).unwrap(), bag);
        }

        #[test]
        fn no_topic_panics_or_reaches_another_device(topic in "[ -~]{0,80}") {
            if let Ok(DevicePublish::Telemetry(_)) = parse_publish(&topic, "dev-1") {
                prop_assert!(topic.starts_with("devices/dev-1/messages/events"));
            }
            if let Some(Subscription::CloudToDevice) = parse_subscription(&topic, "dev-1") {
                prop_assert!(
                    topic == "devices/dev-1/messages/devicebound/#"
                        || topic == "devices/+/messages/devicebound/#",
                    "{}", topic
                );
            }
        }
    }
}
