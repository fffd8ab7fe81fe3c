//! Bytes ↔ MQTT 3.1.1 packets, on rumqttc's `mqttbytes::v4`. A partial packet is a
//! value ([`Decoded::Incomplete`]), not an error; a CONNECT of another protocol
//! version is recognised before the v4 parser sees it, so the session can answer
//! "unacceptable protocol version" instead of failing to parse MQTT 5 properties.

use bytes::BytesMut;
use rumqttc::mqttbytes::{self, v4::Packet};

/// Why a byte stream cannot be decoded; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The fixed header announces more than the configured maximum.
    #[error("packet of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced remaining length.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The bytes are not a valid MQTT 3.1.1 packet.
    #[error("malformed packet: {0}")]
    Malformed(mqttbytes::Error),
    /// The first packet of a connection is not a CONNECT.
    #[error("first packet is not CONNECT (first byte {0:#04x})")]
    NotConnect(u8),
}

/// The outcome of decoding from the front of a buffer.
#[derive(Debug)]
pub enum Decoded {
    /// A whole packet, removed from the buffer.
    Packet(Packet),
    /// A CONNECT with a protocol level other than 4 (3.1.1); the frame is consumed.
    UnsupportedProtocol(u8),
    /// More bytes are needed; at least this many.
    Incomplete(usize),
}

/// Decodes the first packet in `buf`, consuming it. With `expect_connect`, anything
/// but a CONNECT is refused from its first byte, without waiting for the rest of a
/// frame whose length may be garbage.
pub fn decode(
    buf: &mut BytesMut,
    max_packet_size: usize,
    expect_connect: bool,
) -> Result<Decoded, CodecError> {
    if expect_connect
        && let Some(&first) = buf.first()
        && first != 0x10
    {
        return Err(CodecError::NotConnect(first));
    }
    let header = match mqttbytes::check(buf.iter(), max_packet_size) {
        Ok(header) => header,
        Err(mqttbytes::Error::InsufficientBytes(n)) => return Ok(Decoded::Incomplete(n)),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
            return Err(CodecError::TooLarge {
                size,
                limit: max_packet_size,
            });
        }
        Err(err) => return Err(CodecError::Malformed(err)),
    };
    if let Some(level) = connect_protocol_level(buf, header.frame_length())
        && level != 4
    {
        let _ = buf.split_to(header.frame_length());
        return Ok(Decoded::UnsupportedProtocol(level));
    }
    match Packet::read(buf, max_packet_size) {
        Ok(packet) => Ok(Decoded::Packet(packet)),
        Err(err) => Err(CodecError::Malformed(err)),
    }
}

/// For a complete CONNECT frame at the front of `buf`, its protocol level byte.
fn connect_protocol_level(buf: &[u8], frame_len: usize) -> Option<u8> {
    if buf.first().map(|b| b >> 4) != Some(1) {
        return None;
    }
    // Skip the remaining-length bytes (continuation bit 0x80).
    let header_len = 1 + buf[1..].iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    let frame = buf.get(header_len..frame_len)?;
    let name_len = usize::from(u16::from_be_bytes([*frame.first()?, *frame.get(1)?]));
    frame.get(2 + name_len).copied()
}

/// Appends `packet` to `out`.
pub fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), CodecError> {
    packet
        .write(out, usize::MAX)
        .map(|_| ())
        .map_err(CodecError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::{Connect, Publish};

    fn bytes_of(packet: &Packet) -> BytesMut {
        let mut out = BytesMut::new();
        encode(packet, &mut out).unwrap();
        out
    }

    #[test]
    fn a_packet_split_anywhere_decodes_once_complete() {
        let mut publish = Publish::new(
            "devices/d/messages/events/",
            QoS::AtLeastOnce,
            vec![7u8; 300],
        );
        publish.pkid = 1;
        let packet = Packet::Publish(publish);
        let whole = bytes_of(&packet);
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert!(
                matches!(
                    decode(&mut buf, 1024, false).unwrap(),
                    Decoded::Incomplete(_)
                ),
                "cut {cut}"
            );
            assert_eq!(buf.len(), cut, "nothing consumed");
            buf.extend_from_slice(&whole[cut..]);
            match decode(&mut buf, 1024, false).unwrap() {
                Decoded::Packet(Packet::Publish(p)) => assert_eq!(p.payload.len(), 300),
                other => panic!("{other:?}"),
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let packet = Packet::Publish(Publish::new("t", QoS::AtMostOnce, vec![0u8; 2000]));
        let mut buf = bytes_of(&packet);
        assert!(matches!(
            decode(&mut buf, 1024, false),
            Err(CodecError::TooLarge { .. })
        ));
        let mut garbage = BytesMut::from(&b"\x00\x02\xff\xff"[..]);
        assert!(matches!(
            decode(&mut garbage, 1024, false),
            Err(CodecError::Malformed(_))
        ));
        let mut bad_length = BytesMut::from(&b"\x30\xff\xff\xff\xff\x01"[..]);
        assert!(decode(&mut bad_length, 1024, false).is_err());
    }

    #[test]
    fn before_connect_anything_else_is_refused_from_its_first_byte() {
        let mut http = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(
            decode(&mut http, 1024, true),
            Err(CodecError::NotConnect(b'G'))
        ));
        let mut ping = BytesMut::from(&[0xc0u8, 0x00][..]);
        assert!(matches!(
            decode(&mut ping, 1024, true),
            Err(CodecError::NotConnect(0xc0))
        ));
        let mut empty = BytesMut::new();
        assert!(matches!(
            decode(&mut empty, 1024, true),
            Ok(Decoded::Incomplete(_))
        ));
    }

    #[test]
    fn mqtt5_and_31_connects_are_recognised() {
        // MQTT 5 CONNECT: level 5, properties length 0, client id "c".
        let v5 = [
            0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b'c',
        ];
        let mut buf = BytesMut::from(&v5[..]);
        assert!(matches!(
            decode(&mut buf, 1024, false).unwrap(),
            Decoded::UnsupportedProtocol(5)
        ));
        assert!(buf.is_empty());
        // MQTT 3.1: "MQIsdp", level 3.
        let v3 = [
            0x10, 0x0f, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 1, b'c',
        ];
        let mut buf = BytesMut::from(&v3[..]);
        assert!(matches!(
            decode(&mut buf, 1024, false).unwrap(),
            Decoded::UnsupportedProtocol(3)
        ));

        let v4 = bytes_of(&Packet::Connect(Connect::new("dev")));
        let mut buf = v4.clone();
        assert!(matches!(
            decode(&mut buf, 1024, false).unwrap(),
            Decoded::Packet(Packet::Connect(_))
        ));
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests at the edge: arbitrary bytes never panic the decoder, and
    //! whatever it accepts re-encodes to a packet it accepts again.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512), expect_connect in any::<bool>()) {
            let mut buf = BytesMut::from(bytes.as_slice());
            // Decode until the buffer is used up, incomplete, or refused.
            for _ in 0..64 {
                match decode(&mut buf, 1024, expect_connect) {
                    Ok(Decoded::Packet(packet)) => {
                        let mut again = BytesMut::new();
                        if encode(&packet, &mut again).is_ok() {
                            prop_assert!(decode(&mut again, usize::MAX, false).is_ok());
                        }
                    }
                    Ok(Decoded::UnsupportedProtocol(_)) => {}
                    Ok(Decoded::Incomplete(_)) | Err(_) => break,
                }
            }
        }

        #[test]
        fn valid_publishes_survive_any_split(topic in "[a-z/]{1,40}", payload in prop::collection::vec(any::<u8>(), 0..300), cut in 0usize..400) {
            let mut publish = rumqttc::mqttbytes::v4::Publish::new(topic.clone(), rumqttc::mqttbytes::QoS::AtLeastOnce, payload.clone());
            publish.pkid = 1;
            let mut whole = BytesMut::new();
            encode(&Packet::Publish(publish), &mut whole).unwrap();
            let cut = cut.min(whole.len());
            let mut buf = BytesMut::from(&whole[..cut]);
            if cut < whole.len() {
                prop_assert!(matches!(decode(&mut buf, 1 << 20, false), Ok(Decoded::Incomplete(_))));
                buf.extend_from_slice(&whole[cut..]);
            }
            match decode(&mut buf, 1 << 20, false) {
                Ok(Decoded::Packet(Packet::Publish(p))) => {
                    prop_assert_eq!(p.topic, topic);
                    prop_assert_eq!(p.payload.as_ref(), payload.as_slice());
                }
                other => prop_assert!(false, "{other:?}"),
            }
        }
    }
}
