//! Payloads: a template of literal text and placeholders (`{run}`, `{device}`,
//! `{seq}`, `{time_ns}`), rendered per message and parsed back by `--verify`, which
//! matches the literals in order to recover which message of which run a body is.

/// A placeholder or literal of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Run,
    Device,
    Seq,
    TimeNs,
    /// `x` characters that bring the body to the template's size.
    Pad,
}

/// A payload template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
    /// With `Pad`: the size bodies are padded to.
    size: usize,
}

/// A template that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// `{name}` is not a known placeholder.
    #[error("unknown placeholder {{{0}}} (known: {{run}}, {{device}}, {{seq}}, {{time_ns}})")]
    UnknownPlaceholder(String),
    /// A `{` without its `}`.
    #[error("a `{{` without its `}}`")]
    Unclosed,
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
        }
    }

    /// A template from text; `{{` and `}}` are literal braces.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(TemplateError::Unclosed),
                        }
                    }
                    let piece = match name.as_str() {
                        "run" => Piece::Run,
                        "device" => Piece::Device,
                        "seq" => Piece::Seq,
                        "time_ns" => Piece::TimeNs,
                        _ => return Err(TemplateError::UnknownPlaceholder(name)),
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
        Ok(Self { pieces, size: 0 })
    }

    /// Whether a body names its run, device and sequence number.
    pub fn identifies_messages(&self) -> bool {
        [Piece::Run, Piece::Device, Piece::Seq]
            .iter()
            .all(|p| self.pieces.contains(p))
    }

    /// The body of message `seq` of `device` in `run`, sent at `time_ns`.
    pub fn render(&self, run: &str, device: &str, seq: u64, time_ns: u128) -> Vec<u8> {
        let mut out = String::with_capacity(self.size.max(64));
        let mut pad_at = None;
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Run => out.push_str(run),
                Piece::Device => out.push_str(device),
                Piece::Seq => out.push_str(&seq.to_string()),
                Piece::TimeNs => out.push_str(&time_ns.to_string()),
                Piece::Pad => pad_at = Some(out.len()),
            }
        }
        if let Some(at) = pad_at {
            let missing = self.size.saturating_sub(out.len());
            out.insert_str(at, &"x".repeat(missing));
        }
        out.into_bytes()
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
                Piece::Pad | Piece::Literal(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

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
            Template::parse("{nope}").unwrap_err(),
            TemplateError::UnknownPlaceholder("nope".into())
        );
        assert_eq!(
            Template::parse("{seq").unwrap_err(),
            TemplateError::Unclosed
        );
        assert_eq!(
            Template::parse("{device}{seq}").unwrap_err(),
            TemplateError::Adjacent
        );
    }
}
