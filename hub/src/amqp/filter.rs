//! The Event Hubs selector filter (`apache.org:selector-filter:string`) a partition
//! receiver attaches with: `amqp.annotation.x-opt-offset > '12'`, `… >= '12'`, with
//! `x-opt-sequence-number` or `x-opt-enqueued-time` (epoch milliseconds), `'-1'` for
//! the start and `'@latest'` for the end. A small fixed grammar, parsed without
//! recursion; anything else is an error the attach is refused with.

/// Where a receiver starts, as the filter says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The first retained message (`'-1'`, or no filter).
    Earliest,
    /// The next message to arrive (`'@latest'`).
    Latest,
    /// After (or at, when inclusive) an offset / sequence number (the hub's offsets
    /// are both).
    Offset {
        /// The offset named.
        value: u64,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
    /// The first message enqueued after (or at) a time, epoch milliseconds.
    EnqueuedTime {
        /// Milliseconds since the Unix epoch.
        millis: i64,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
}

/// Why a selector does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Longer than [`MAX_FILTER_BYTES`].
    #[error("the selector filter is longer than {MAX_FILTER_BYTES} bytes")]
    TooLong,
    /// Not `amqp.annotation.NAME OP 'VALUE'`.
    #[error("the selector filter is not `amqp.annotation.<name> > '<value>'`")]
    Syntax,
    /// An annotation other than offset, sequence number and enqueued time.
    #[error("the selector filter names an unsupported annotation")]
    UnknownAnnotation,
    /// An operator other than `>` and `>=` (Event Hubs accepts only these).
    #[error("the selector filter's operator must be > or >=")]
    Operator,
    /// The value is not a number (or `-1` / `@latest` where allowed).
    #[error("the selector filter's value is not valid for its annotation")]
    Value,
}

/// Longest selector accepted.
pub const MAX_FILTER_BYTES: usize = 512;

/// The symbol and numeric descriptors of the selector filter.
pub const SELECTOR_SYMBOL: &str = "apache.org:selector-filter:string";
/// The numeric descriptor the JS SDK uses.
pub const SELECTOR_CODE: u64 = 0x0000_468C_0000_0004;

/// Parses a selector expression.
pub fn parse(expression: &str) -> Result<StartPosition, FilterError> {
    if expression.len() > MAX_FILTER_BYTES {
        return Err(FilterError::TooLong);
    }
    let rest = expression.trim();
    let prefix = "amqp.annotation.";
    let rest = rest
        .get(..prefix.len())
        .filter(|head| head.eq_ignore_ascii_case(prefix))
        .map(|_| &rest[prefix.len()..])
        .ok_or(FilterError::Syntax)?;
    let name_end = rest
        .find(|c: char| c.is_whitespace() || c == '>' || c == '<' || c == '=')
        .ok_or(FilterError::Syntax)?;
    let (name, rest) = rest.split_at(name_end);
    let rest = rest.trim_start();
    let (inclusive, rest) = if let Some(rest) = rest.strip_prefix(">=") {
        (true, rest)
    } else if let Some(rest) = rest.strip_prefix('>') {
        (false, rest)
    } else if rest.starts_with('<') || rest.starts_with('=') {
        return Err(FilterError::Operator);
    } else {
        return Err(FilterError::Syntax);
    };
    let rest = rest.trim();
    let value = rest
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .or_else(|| rest.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
        .ok_or(FilterError::Syntax)?;
    if value.contains(['\'', '"']) {
        return Err(FilterError::Syntax);
    }
    let number = |value: &str| -> Result<i64, FilterError> {
        if value.is_empty()
            || value.len() > 20
            || !value
                .strip_prefix('-')
                .unwrap_or(value)
                .bytes()
                .all(|b| b.is_ascii_digit())
        {
            return Err(FilterError::Value);
        }
        value.parse::<i64>().map_err(|_| FilterError::Value)
    };
    match name.to_ascii_lowercase().as_str() {
        "x-opt-offset" | "x-opt-sequence-number" => {
            if value == "@latest" {
                return if name.eq_ignore_ascii_case("x-opt-offset") {
                    Ok(StartPosition::Latest)
                } else {
                    Err(FilterError::Value)
                };
            }
            match number(value)? {
                -1 => Ok(StartPosition::Earliest),
                n if n < 0 => Err(FilterError::Value),
                n => Ok(StartPosition::Offset {
                    value: n as u64,
                    inclusive,
                }),
            }
        }
        "x-opt-enqueued-time" => Ok(StartPosition::EnqueuedTime {
            millis: number(value)?,
            inclusive,
        }),
        _ => Err(FilterError::UnknownAnnotation),
    }
}

impl StartPosition {
    /// The first offset to deliver for a partition holding `[first, end)`, when the
    /// position is not a time (times need the stream read: see the caller).
    pub fn offset_in(self, first: u64, end: u64) -> Option<u64> {
        match self {
            StartPosition::Earliest => Some(first),
            StartPosition::Latest => Some(end),
            StartPosition::Offset { value, inclusive } => {
                let start = if inclusive {
                    value
                } else {
                    value.saturating_add(1)
                };
                Some(start.clamp(first, end))
            }
            StartPosition::EnqueuedTime { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_sdks_expressions_parse() {
        assert_eq!(
            parse("amqp.annotation.x-opt-offset > '-1'"),
            Ok(StartPosition::Earliest)
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-offset > '@latest'"),
            Ok(StartPosition::Latest)
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-offset >= '12'"),
            Ok(StartPosition::Offset {
                value: 12,
                inclusive: true
            })
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-sequence-number > '7'"),
            Ok(StartPosition::Offset {
                value: 7,
                inclusive: false
            })
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-sequence-number > '-1'"),
            Ok(StartPosition::Earliest)
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-enqueued-time > '1733356800000'"),
            Ok(StartPosition::EnqueuedTime {
                millis: 1_733_356_800_000,
                inclusive: false
            })
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-offset < '1'"),
            Err(FilterError::Operator)
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-foo > '1'"),
            Err(FilterError::UnknownAnnotation)
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-offset > '1' OR 1=1"),
            Err(FilterError::Syntax)
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-offset > '-2'"),
            Err(FilterError::Value)
        );
    }

    #[test]
    fn positions_resolve_within_the_partition() {
        let off = |value, inclusive| StartPosition::Offset { value, inclusive };
        assert_eq!(StartPosition::Earliest.offset_in(5, 10), Some(5));
        assert_eq!(StartPosition::Latest.offset_in(5, 10), Some(10));
        assert_eq!(off(7, false).offset_in(5, 10), Some(8));
        assert_eq!(off(7, true).offset_in(5, 10), Some(7));
        assert_eq!(off(1, true).offset_in(5, 10), Some(5));
        assert_eq!(off(u64::MAX, false).offset_in(5, 10), Some(10));
    }

    proptest! {
        #[test]
        fn any_text_parses_or_errs_without_panicking(text in ".{0,600}") {
            let _ = parse(&text);
        }

        #[test]
        fn printed_positions_parse_back(value in 0u64..=(i64::MAX as u64), inclusive: bool,
                                        seq: bool, spaces in " {0,3}") {
            let name = if seq { "x-opt-sequence-number" } else { "x-opt-offset" };
            let op = if inclusive { ">=" } else { ">" };
            let text = format!("amqp.annotation.{name}{spaces}{op}{spaces}'{value}'");
            prop_assert_eq!(parse(&text), Ok(StartPosition::Offset { value, inclusive }));
        }

        #[test]
        fn resolved_offsets_stay_in_the_partition(value: u64, inclusive: bool,
                                                  first in 0u64..1000, len in 0u64..1000) {
            let end = first + len;
            let start = StartPosition::Offset { value, inclusive }.offset_in(first, end);
            prop_assert!(start.is_some_and(|s| (first..=end).contains(&s)));
        }
    }
}
