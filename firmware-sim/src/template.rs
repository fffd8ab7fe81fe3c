//! Payloads: a template of literal text and placeholders (`{run}`, `{device}`,
//! `{seq}`, `{time_ns}`) and generated fields ([`crate::generators`]), parsed once and
//! rendered per message into one buffer, and parsed back by `--verify`, which
//! matches the literals in order to recover which message of which run a body is;
//! and [`parse_payload`], `--payload`'s parser (a size or a template).

use std::io::Write;

use crate::generators::{Fields, Generator, NAMES};

/// A placeholder or literal of a template.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Literal(String),
    Run,
    Device,
    Seq,
    TimeNs,
    /// `x` characters that bring the body to the template's size.
    Pad,
    /// A generated field.
    Gen(Generator),
}

/// A payload template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pieces: Vec<Piece>,
    /// With `Pad`: the size bodies are padded to.
    size: usize,
    /// Seeds each device's generated fields.
    seed: u64,
}

/// A template that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// `{name}` is not a known placeholder.
    #[error(
        "unknown placeholder {{{name}}} at character {at} (known: {{run}}, {{device}}, {{seq}}, {{time_ns}}, {NAMES})"
    )]
    UnknownPlaceholder {
        /// Its text between the braces.
        name: String,
        /// Where its `{` is (characters from 0).
        at: usize,
    },
    /// A generated field with bad arguments.
    #[error("{{{field}}} at character {at}: {reason}")]
    Field {
        /// Its text between the braces.
        field: String,
        /// Where its `{` is (characters from 0).
        at: usize,
        /// What is wrong.
        reason: String,
    },
    /// A `{` without its `}`.
    #[error("a `{{` at character {0} without its `}}`")]
    Unclosed(usize),
    /// Two placeholders with nothing between them cannot be told apart when parsing.
    #[error("placeholders must be separated by literal text")]
    Adjacent,
}

/// What `--verify` recovers from a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// The run id.
    pub run: String,
    /// The device id.
    pub device: String,
    /// The device's sequence number.
    pub seq: u64,
    /// Send time, ns since the Unix epoch, when the template carries it.
    pub time_ns: Option<u128>,
}

impl Template {
    /// The default body: a JSON record padded with `x`s to `size` bytes (bodies are
    /// longer than `size` when the record alone is, about 70 bytes).
    pub fn sized(size: usize) -> Self {
        let lit = |s: &str| Piece::Literal(s.to_string());
        Self {
            pieces: vec![
                lit("{\"r\":\""),
                Piece::Run,
                lit("\",\"d\":\""),
                Piece::Device,
                lit("\",\"n\":"),
                Piece::Seq,
                lit(",\"t\":"),
                Piece::TimeNs,
                lit(",\"p\":\""),
                Piece::Pad,
                lit("\"}"),
            ],
            size,
            seed: 0,
        }
    }

    /// The same template with generated fields seeded by `seed`.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// A template from text; `{{` and `}}` are literal braces.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().enumerate().peekable();
        let mut slots = 0;
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, c)) => name.push(c),
                            None => return Err(TemplateError::Unclosed(at)),
                        }
                    }
                    let (kind, args) = name.split_once(':').unwrap_or((name.as_str(), ""));
                    let piece = match name.as_str() {
                        "run" => Piece::Run,
                        "device" => Piece::Device,
                        "seq" => Piece::Seq,
                        "time_ns" => Piece::TimeNs,
                        _ => match Generator::parse(kind.trim(), args, &mut slots) {
                            Some(Ok(generator)) => Piece::Gen(generator),
                            Some(Err(err)) => {
                                return Err(TemplateError::Field {
                                    field: name,
                                    at,
                                    reason: err.0,
                                });
                            }
                            None => return Err(TemplateError::UnknownPlaceholder { name, at }),
                        },
                    };
                    let after_placeholder = pieces
                        .last()
                        .is_some_and(|p| !matches!(p, Piece::Literal(_)));
                    if literal.is_empty() && after_placeholder {
                        return Err(TemplateError::Adjacent);
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(piece);
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(Self {
            pieces,
            size: 0,
            seed: 0,
        })
    }

    /// Whether a body names its run, device and sequence number.
    pub fn identifies_messages(&self) -> bool {
        [Piece::Run, Piece::Device, Piece::Seq]
            .iter()
            .all(|p| self.pieces.contains(p))
    }

    /// A device's state for the generated fields: made once per device, it carries
    /// walk positions and the random stream from message to message.
    pub fn fields(&self, device: &str) -> Fields {
        let generators = self.pieces.iter().filter_map(|p| match p {
            Piece::Gen(g) => Some(g),
            _ => None,
        });
        Fields::new(generators, self.seed, device)
    }

    /// The body of message `seq` of `device` in `run`, sent at `time_ns`, for a
    /// template without state (generated fields start afresh each call: devices use
    /// [`Template::render_with`]).
    pub fn render(&self, run: &str, device: &str, seq: u64, time_ns: u128) -> Vec<u8> {
        self.render_with(&mut self.fields(device), run, device, seq, time_ns)
    }

    /// The body of message `seq` of `device` in `run`, sent at `time_ns`; `fields` is
    /// the device's state from [`Template::fields`]. The body is the one allocation.
    pub fn render_with(
        &self,
        fields: &mut Fields,
        run: &str,
        device: &str,
        seq: u64,
        time_ns: u128,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size.max(64));
        let mut pad_at = None;
        for piece in &self.pieces {
            // Writing into a Vec cannot fail.
            match piece {
                Piece::Literal(text) => out.extend_from_slice(text.as_bytes()),
                Piece::Run => out.extend_from_slice(run.as_bytes()),
                Piece::Device => out.extend_from_slice(device.as_bytes()),
                Piece::Seq => {
                    let _ = write!(out, "{seq}");
                }
                Piece::TimeNs => {
                    let _ = write!(out, "{time_ns}");
                }
                Piece::Pad => pad_at = Some(out.len()),
                Piece::Gen(generator) => generator.write(fields, seq, time_ns, &mut out),
            }
        }
        if let Some(at) = pad_at {
            let missing = self.size.saturating_sub(out.len());
            out.splice(at..at, std::iter::repeat_n(b'x', missing));
        }
        out
    }

    /// Recovers run, device and sequence number from a body this template rendered.
    pub fn parse_body(&self, body: &str) -> Option<Stamp> {
        let (mut run, mut device, mut seq, mut time_ns) = (None, None, None, None);
        let mut rest = body;
        for (i, piece) in self.pieces.iter().enumerate() {
            if let Piece::Literal(text) = piece {
                rest = rest.strip_prefix(text.as_str())?;
                continue;
            }
            // A placeholder runs up to the next literal (or the end).
            let value = match self.pieces.get(i + 1) {
                Some(Piece::Literal(next)) => {
                    let end = rest.find(next.as_str())?;
                    let (value, tail) = rest.split_at(end);
                    rest = tail;
                    value
                }
                _ => std::mem::take(&mut rest),
            };
            match piece {
                Piece::Run => run = Some(value.to_string()),
                Piece::Device => device = Some(value.to_string()),
                Piece::Seq => seq = Some(value.parse().ok()?),
                Piece::TimeNs => time_ns = Some(value.parse().ok()?),
                Piece::Pad | Piece::Literal(_) | Piece::Gen(_) => {}
            }
        }
        rest.is_empty().then_some(())?;
        Some(Stamp {
            run: run?,
            device: device?,
            seq: seq?,
            time_ns,
        })
    }
}

/// A payload size or template.
pub fn parse_payload(text: &str) -> Result<Template, String> {
    match text.parse::<usize>() {
        Ok(size) if size > 256 * 1024 => Err(format!(
            "{size} bytes is more than the hub's 256 KiB telemetry limit"
        )),
        Ok(size) => Ok(Template::sized(size)),
        Err(_) if text.len() > 64 * 1024 => {
            Err("a payload template may be at most 64 KiB".to_string())
        }
        Err(_) => Template::parse(text).map_err(|err| err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_fields_render_per_device_and_are_skipped_when_parsing_back() {
        let template = Template::parse(
            "{{\"d\":\"{device}\",\"r\":\"{run}\",\"n\":{seq},\"temp\":{walk:start=20,step=0.5},\"c\":{counter:start=10},\"at\":\"{timestamp}\"}}",
        )
        .unwrap()
        .with_seed(5);
        let mut fields = template.fields("dev-1");
        let first = template.render_with(&mut fields, "r", "dev-1", 0, 1_000_000_000);
        let text = String::from_utf8(first).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            (json["temp"].as_f64().unwrap() - 20.0).abs() <= 0.5,
            "{text}"
        );
        assert_eq!(json["c"], 10);
        assert_eq!(json["at"], "1970-01-01T00:00:01.000Z");
        let stamp = template.parse_body(&text).unwrap();
        assert_eq!((stamp.device.as_str(), stamp.seq), ("dev-1", 0));
        // The same seed, the same values; state carries from message to message.
        let mut again = template.fields("dev-1");
        let bodies = |fields: &mut Fields| {
            (0..20)
                .map(|n| template.render_with(fields, "r", "dev-1", n, 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(bodies(&mut template.fields("dev-1")), bodies(&mut again));
        let err = Template::parse("{{\"t\":{walk:stpe=1}}}")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("walk:stpe=1") && err.contains("character 6"),
            "{err}"
        );
    }

    #[test]
    fn sized_bodies_have_the_size_and_parse_back() {
        let template = Template::sized(256);
        let body = template.render("r1", "sim-7", 42, 1_700_000_000_000_000_000);
        assert_eq!(body.len(), 256);
        let text = String::from_utf8(body).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["d"], "sim-7");
        assert_eq!(
            template.parse_body(&text).unwrap(),
            Stamp {
                run: "r1".into(),
                device: "sim-7".into(),
                seq: 42,
                time_ns: Some(1_700_000_000_000_000_000),
            }
        );
        // Smaller than the record: the record, unpadded.
        assert!(Template::sized(8).render("r", "d", 1, 2).len() > 8);
    }

    #[test]
    fn templates_render_and_parse_and_refuse_what_they_cannot_read() {
        let template =
            Template::parse("{{\"id\":\"{device}\",\"run\":\"{run}\",\"n\":{seq}}}").unwrap();
        assert!(template.identifies_messages());
        let body = String::from_utf8(template.render("abc", "dev-1", 9, 0)).unwrap();
        assert_eq!(body, "{\"id\":\"dev-1\",\"run\":\"abc\",\"n\":9}");
        let stamp = template.parse_body(&body).unwrap();
        assert_eq!((stamp.device.as_str(), stamp.seq), ("dev-1", 9));
        assert!(template.parse_body("{\"id\":\"x\"}").is_none());
        assert!(template.parse_body(&format!("{body}trailing")).is_none());
        assert!(
            !Template::parse("{{\"temp\":21}}")
                .unwrap()
                .identifies_messages()
        );
        assert_eq!(
            Template::parse("ab{nope}").unwrap_err(),
            TemplateError::UnknownPlaceholder {
                name: "nope".into(),
                at: 2
            }
        );
        assert_eq!(
            Template::parse("{seq").unwrap_err(),
            TemplateError::Unclosed(0)
        );
        assert_eq!(
            Template::parse("{device}{seq}").unwrap_err(),
            TemplateError::Adjacent
        );
    }
}
