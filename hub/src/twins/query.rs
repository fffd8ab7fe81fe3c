//! The device query language (DESIGN section 3): a hand-written tokenizer and
//! recursive-descent parser for
//! `SELECT [TOP n] * | COUNT() [AS x] | fields FROM devices [WHERE …] [GROUP BY …]`
//! with `= != <> < > <= >= AND OR NOT IN NIN IS_DEFINED()`, and an evaluator over
//! rows that resolve dotted paths. Errors name the position in the query text.
//!
//! Comparisons follow the SQL-like rules of Azure's query language: a missing field
//! or values of different types compare as *undefined*, which is neither true nor
//! false; a row matches only when the condition is true.

use std::cmp::Ordering;

use serde_json::{Map, Value};

/// A query error with its position (0-based character offset).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query error at position {position}: {message}")]
pub struct QueryError {
    /// Where in the query text.
    pub position: usize,
    /// What is wrong.
    pub message: String,
}

/// A dotted field path (`tags.site`, `properties.reported.fw`).
pub type Path = Vec<String>;

/// What a query selects.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// `*`: whole documents.
    All,
    /// A list of items.
    Items(Vec<SelectItem>),
}

/// One selected item.
#[derive(Debug, Clone, PartialEq)]
pub enum SelectItem {
    /// A field, named by its alias or last path segment.
    Field {
        /// The path.
        path: Path,
        /// `AS alias`.
        alias: Option<String>,
    },
    /// `COUNT()`.
    Count {
        /// `AS alias`.
        alias: Option<String>,
    },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `!=` or `<>`
    Ne,
    /// `<`
    Lt,
    /// `>`
    Gt,
    /// `<=`
    Le,
    /// `>=`
    Ge,
}

/// A condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `a AND b`.
    And(Box<Expr>, Box<Expr>),
    /// `a OR b`.
    Or(Box<Expr>, Box<Expr>),
    /// `NOT a`.
    Not(Box<Expr>),
    /// `operand op operand`.
    Compare(Operand, CmpOp, Operand),
    /// `operand IN [...]` (or `NIN` when `negated`).
    In(Operand, Vec<Value>, bool),
    /// `IS_DEFINED(path)`.
    IsDefined(Path),
}

/// A comparison side.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A field.
    Field(Path),
    /// A literal.
    Literal(Value),
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// `TOP n`.
    pub top: Option<usize>,
    /// What to select.
    pub selection: Selection,
    /// `WHERE`.
    pub filter: Option<Expr>,
    /// `GROUP BY`.
    pub group_by: Vec<Path>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Num(f64),
    Sym(&'static str),
}

fn tokenize(text: &str) -> Result<Vec<(Token, usize)>, QueryError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                i += 1;
            }
            tokens.push((Token::Word(chars[start..i].iter().collect()), start));
            continue;
        }
        if c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()))
        {
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || chars[i] == '.'
                    || chars[i] == 'e'
                    || chars[i] == 'E')
            {
                i += 1;
            }
            let literal: String = chars[start..i].iter().collect();
            let number = literal.parse().map_err(|_| QueryError {
                position: start,
                message: format!("{literal:?} is not a number"),
            })?;
            tokens.push((Token::Num(number), start));
            continue;
        }
        if c == '\'' || c == '"' {
            i += 1;
            let mut value = String::new();
            loop {
                match chars.get(i) {
                    None => {
                        return Err(QueryError {
                            position: start,
                            message: "unterminated string".into(),
                        });
                    }
                    // A doubled quote is a quote inside the string.
                    Some(&q) if q == c && chars.get(i + 1) == Some(&c) => {
                        value.push(c);
                        i += 2;
                    }
                    Some(&q) if q == c => {
                        i += 1;
                        break;
                    }
                    Some(&other) => {
                        value.push(other);
                        i += 1;
                    }
                }
            }
            tokens.push((Token::Str(value), start));
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let sym = match two.as_str() {
            "!=" => Some("!="),
            "<>" => Some("!="),
            "<=" => Some("<="),
            ">=" => Some(">="),
            _ => None,
        };
        if let Some(sym) = sym {
            tokens.push((Token::Sym(sym), start));
            i += 2;
            continue;
        }
        let sym = match c {
            '=' => "=",
            '<' => "<",
            '>' => ">",
            '(' => "(",
            ')' => ")",
            '[' => "[",
            ']' => "]",
            ',' => ",",
            '.' => ".",
            '*' => "*",
            _ => {
                return Err(QueryError {
                    position: start,
                    message: format!("unexpected character {c:?}"),
                });
            }
        };
        tokens.push((Token::Sym(sym), start));
        i += 1;
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(Token, usize)>,
    at: usize,
    end: usize,
}

impl Parser {
    fn position(&self) -> usize {
        self.tokens.get(self.at).map_or(self.end, |(_, p)| *p)
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, QueryError> {
        Err(QueryError {
            position: self.position(),
            message: message.into(),
        })
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(t, _)| t)
    }

    fn keyword(&mut self, word: &str) -> bool {
        if matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(word)) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect_keyword(&mut self, word: &str) -> Result<(), QueryError> {
        if self.keyword(word) {
            Ok(())
        } else {
            self.error(format!("expected {word}"))
        }
    }

    fn symbol(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Token::Sym(s)) if *s == sym) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect_symbol(&mut self, sym: &str) -> Result<(), QueryError> {
        if self.symbol(sym) {
            Ok(())
        } else {
            self.error(format!("expected '{sym}'"))
        }
    }

    fn identifier(&mut self) -> Result<String, QueryError> {
        match self.peek() {
            Some(Token::Word(word)) if !is_reserved(word) => {
                let word = word.clone();
                self.at += 1;
                Ok(word)
            }
            _ => self.error("expected a field name"),
        }
    }

    fn path(&mut self) -> Result<Path, QueryError> {
        let mut path = vec![self.identifier()?];
        while self.symbol(".") {
            path.push(self.identifier()?);
        }
        Ok(path)
    }

    fn query(&mut self) -> Result<Query, QueryError> {
        self.expect_keyword("SELECT")?;
        let top = if self.keyword("TOP") {
            match self.peek() {
                Some(Token::Num(n)) if *n >= 0.0 && n.fract() == 0.0 => {
                    let n = *n as usize;
                    self.at += 1;
                    Some(n)
                }
                _ => return self.error("TOP takes a whole number"),
            }
        } else {
            None
        };
        let selection = if self.symbol("*") {
            Selection::All
        } else {
            let mut items = vec![self.select_item()?];
            while self.symbol(",") {
                items.push(self.select_item()?);
            }
            Selection::Items(items)
        };
        self.expect_keyword("FROM")?;
        if !self.keyword("devices") {
            return self.error("only FROM devices is supported");
        }
        let filter = if self.keyword("WHERE") {
            Some(self.or()?)
        } else {
            None
        };
        let mut group_by = Vec::new();
        if self.keyword("GROUP") {
            self.expect_keyword("BY")?;
            group_by.push(self.path()?);
            while self.symbol(",") {
                group_by.push(self.path()?);
            }
        }
        if self.at < self.tokens.len() {
            return self.error("unexpected text after the query");
        }
        Ok(Query {
            top,
            selection,
            filter,
            group_by,
        })
    }

    fn alias(&mut self) -> Result<Option<String>, QueryError> {
        if self.keyword("AS") {
            self.identifier().map(Some)
        } else {
            Ok(None)
        }
    }

    fn select_item(&mut self) -> Result<SelectItem, QueryError> {
        if self.keyword("COUNT") {
            self.expect_symbol("(")?;
            self.expect_symbol(")")?;
            return Ok(SelectItem::Count {
                alias: self.alias()?,
            });
        }
        let path = self.path()?;
        Ok(SelectItem::Field {
            path,
            alias: self.alias()?,
        })
    }

    fn or(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.and()?;
        while self.keyword("OR") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.not()?;
        while self.keyword("AND") {
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, QueryError> {
        if self.keyword("NOT") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, QueryError> {
        if self.symbol("(") {
            let inner = self.or()?;
            self.expect_symbol(")")?;
            return Ok(inner);
        }
        if self.keyword("IS_DEFINED") {
            self.expect_symbol("(")?;
            let path = self.path()?;
            self.expect_symbol(")")?;
            return Ok(Expr::IsDefined(path));
        }
        let left = self.operand()?;
        for (keyword, negated) in [("IN", false), ("NIN", true)] {
            if self.keyword(keyword) {
                self.expect_symbol("[")?;
                let mut values = vec![self.literal()?];
                while self.symbol(",") {
                    values.push(self.literal()?);
                }
                self.expect_symbol("]")?;
                return Ok(Expr::In(left, values, negated));
            }
        }
        let op = match self.peek() {
            Some(Token::Sym("=")) => CmpOp::Eq,
            Some(Token::Sym("!=")) => CmpOp::Ne,
            Some(Token::Sym("<")) => CmpOp::Lt,
            Some(Token::Sym(">")) => CmpOp::Gt,
            Some(Token::Sym("<=")) => CmpOp::Le,
            Some(Token::Sym(">=")) => CmpOp::Ge,
            _ => return self.error("expected a comparison (=, !=, <>, <, >, <=, >=, IN, NIN)"),
        };
        self.at += 1;
        let right = self.operand()?;
        Ok(Expr::Compare(left, op, right))
    }

    fn operand(&mut self) -> Result<Operand, QueryError> {
        match self.peek() {
            Some(Token::Word(w)) if !is_literal_word(w) => Ok(Operand::Field(self.path()?)),
            _ => Ok(Operand::Literal(self.literal()?)),
        }
    }

    fn literal(&mut self) -> Result<Value, QueryError> {
        let value = match self.peek() {
            Some(Token::Str(s)) => Value::String(s.clone()),
            Some(Token::Num(n)) => {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("true") => Value::Bool(true),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("false") => Value::Bool(false),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("null") => Value::Null,
            _ => return self.error("expected a value (string, number, true, false or null)"),
        };
        self.at += 1;
        Ok(value)
    }
}

fn is_literal_word(word: &str) -> bool {
    ["true", "false", "null"]
        .iter()
        .any(|w| word.eq_ignore_ascii_case(w))
}

fn is_reserved(word: &str) -> bool {
    [
        "SELECT",
        "TOP",
        "FROM",
        "WHERE",
        "GROUP",
        "BY",
        "AND",
        "OR",
        "NOT",
        "IN",
        "NIN",
        "AS",
        "COUNT",
        "IS_DEFINED",
    ]
    .iter()
    .any(|w| word.eq_ignore_ascii_case(w))
}

/// Parses a query.
pub fn parse(text: &str) -> Result<Query, QueryError> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        at: 0,
        end: text.chars().count(),
    };
    let query = parser.query()?;
    query.validate()?;
    Ok(query)
}

impl Query {
    fn validate(&self) -> Result<(), QueryError> {
        let invalid = |message: &str| {
            Err(QueryError {
                position: 0,
                message: message.to_string(),
            })
        };
        match &self.selection {
            Selection::All if !self.group_by.is_empty() => {
                invalid("SELECT * cannot be grouped; select the GROUP BY fields and COUNT()")
            }
            Selection::Items(items) if !self.group_by.is_empty() => {
                for item in items {
                    if let SelectItem::Field { path, .. } = item
                        && !self.group_by.contains(path)
                    {
                        return invalid(&format!(
                            "{} is selected but not in GROUP BY",
                            path.join(".")
                        ));
                    }
                }
                Ok(())
            }
            Selection::Items(items)
                if items.iter().any(|i| matches!(i, SelectItem::Count { .. }))
                    && items.iter().any(|i| matches!(i, SelectItem::Field { .. })) =>
            {
                invalid("fields next to COUNT() need GROUP BY")
            }
            _ => Ok(()),
        }
    }

    /// Whether the query is an aggregate (COUNT or GROUP BY).
    pub fn is_aggregate(&self) -> bool {
        !self.group_by.is_empty()
            || matches!(&self.selection, Selection::Items(items) if items.iter().any(|i| matches!(i, SelectItem::Count { .. })))
    }

    /// Every path the query reads.
    pub fn paths(&self) -> Vec<&Path> {
        fn walk<'a>(expr: &'a Expr, out: &mut Vec<&'a Path>) {
            match expr {
                Expr::And(a, b) | Expr::Or(a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
                Expr::Not(a) => walk(a, out),
                Expr::Compare(l, _, r) => {
                    for side in [l, r] {
                        if let Operand::Field(p) = side {
                            out.push(p);
                        }
                    }
                }
                Expr::In(Operand::Field(p), _, _) | Expr::IsDefined(p) => out.push(p),
                Expr::In(..) => {}
            }
        }
        let mut out = Vec::new();
        if let Some(filter) = &self.filter {
            walk(filter, &mut out);
        }
        if let Selection::Items(items) = &self.selection {
            for item in items {
                if let SelectItem::Field { path, .. } = item {
                    out.push(path);
                }
            }
        }
        out.extend(self.group_by.iter());
        out
    }
}

/// Something a query can read fields from.
pub trait Row {
    /// The value at `path`, if defined.
    fn get(&self, path: &[String]) -> Option<Value>;
}

/// Follows `path` inside a JSON object.
pub fn lookup<'a>(map: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let value = map.get(first)?;
    if rest.is_empty() {
        return Some(value);
    }
    match value {
        Value::Object(child) => lookup(child, rest),
        _ => None,
    }
}

fn compare(left: &Value, right: &Value) -> Option<Ordering> {
    match (left, right) {
        (Value::Number(a), Value::Number(b)) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        _ => None,
    }
}

fn operand(row: &dyn Row, operand: &Operand) -> Option<Value> {
    match operand {
        Operand::Field(path) => row.get(path),
        Operand::Literal(value) => Some(value.clone()),
    }
}

/// Three-valued evaluation: `None` is undefined.
pub fn evaluate(expr: &Expr, row: &dyn Row) -> Option<bool> {
    match expr {
        Expr::And(a, b) => match (evaluate(a, row), evaluate(b, row)) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Expr::Or(a, b) => match (evaluate(a, row), evaluate(b, row)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Expr::Not(a) => evaluate(a, row).map(|v| !v),
        Expr::IsDefined(path) => Some(row.get(path).is_some()),
        Expr::Compare(l, op, r) => {
            let ordering = compare(&operand(row, l)?, &operand(row, r)?)?;
            Some(match op {
                CmpOp::Eq => ordering == Ordering::Equal,
                CmpOp::Ne => ordering != Ordering::Equal,
                CmpOp::Lt => ordering == Ordering::Less,
                CmpOp::Gt => ordering == Ordering::Greater,
                CmpOp::Le => ordering != Ordering::Greater,
                CmpOp::Ge => ordering != Ordering::Less,
            })
        }
        Expr::In(l, values, negated) => {
            let value = operand(row, l)?;
            let found = values
                .iter()
                .any(|v| compare(&value, v) == Some(Ordering::Equal));
            Some(found != *negated)
        }
    }
}

/// Whether `row` passes the query's filter.
pub fn matches(query: &Query, row: &dyn Row) -> bool {
    query
        .filter
        .as_ref()
        .is_none_or(|f| evaluate(f, row) == Some(true))
}

/// The name a selected item gets in results.
pub fn item_name(item: &SelectItem, index: usize) -> String {
    match item {
        SelectItem::Field { alias: Some(a), .. } | SelectItem::Count { alias: Some(a) } => {
            a.clone()
        }
        SelectItem::Field { path, .. } => path.last().cloned().unwrap_or_default(),
        SelectItem::Count { alias: None } => format!("${}", index + 1),
    }
}

/// Projects `row` onto the selected fields (undefined fields are left out).
pub fn project(items: &[SelectItem], row: &dyn Row) -> Value {
    let mut out = Map::new();
    for (index, item) in items.iter().enumerate() {
        if let SelectItem::Field { path, .. } = item
            && let Some(value) = row.get(path)
        {
            out.insert(item_name(item, index), value);
        }
    }
    Value::Object(out)
}

/// Aggregates matching rows: one result row per group (or one in all for COUNT
/// without GROUP BY).
pub fn aggregate<'a>(query: &Query, rows: impl Iterator<Item = &'a dyn Row>) -> Vec<Value> {
    let items = match &query.selection {
        Selection::Items(items) => items.as_slice(),
        Selection::All => &[],
    };
    let mut groups: Vec<(Vec<Option<Value>>, u64)> = Vec::new();
    for row in rows {
        let key: Vec<Option<Value>> = query.group_by.iter().map(|p| row.get(p)).collect();
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, count)) => *count += 1,
            None => groups.push((key, 1)),
        }
    }
    if groups.is_empty() && query.group_by.is_empty() {
        groups.push((Vec::new(), 0));
    }
    groups
        .into_iter()
        .map(|(key, count)| {
            let mut out = Map::new();
            for (index, item) in items.iter().enumerate() {
                match item {
                    SelectItem::Count { .. } => {
                        out.insert(item_name(item, index), Value::from(count));
                    }
                    SelectItem::Field { path, .. } => {
                        let position = query.group_by.iter().position(|p| p == path);
                        if let Some(Some(value)) = position.and_then(|i| key.get(i)) {
                            out.insert(item_name(item, index), value.clone());
                        }
                    }
                }
            }
            Value::Object(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Doc(Value);

    impl Row for Doc {
        fn get(&self, path: &[String]) -> Option<Value> {
            match &self.0 {
                Value::Object(map) => lookup(map, path).cloned(),
                _ => None,
            }
        }
    }

    fn run(query: &str, docs: &[Value]) -> Vec<String> {
        let query = parse(query).unwrap();
        docs.iter()
            .map(|d| Doc(d.clone()))
            .filter(|d| matches(&query, d))
            .map(|d| d.0["deviceId"].as_str().unwrap().to_string())
            .collect()
    }

    fn docs() -> Vec<Value> {
        vec![
            json!({"deviceId": "a", "tags": {"site": "oslo", "floor": 1}, "properties": {"reported": {"fw": 2}}}),
            json!({"deviceId": "b", "tags": {"site": "oslo", "floor": 3}, "properties": {"reported": {"fw": 4}}}),
            json!({"deviceId": "c", "tags": {"site": "bergen"}, "properties": {"reported": {}}}),
        ]
    }

    #[test]
    fn filters_with_comparisons_logic_and_membership() {
        let docs = docs();
        assert_eq!(
            run(
                "SELECT * FROM devices WHERE tags.site = 'oslo' AND properties.reported.fw < 3",
                &docs
            ),
            ["a"]
        );
        assert_eq!(
            run(
                "select * from devices where tags.site = \"oslo\" or tags.site = 'bergen'",
                &docs
            ),
            ["a", "b", "c"]
        );
        assert_eq!(
            run("SELECT * FROM devices WHERE tags.floor >= 3", &docs),
            ["b"]
        );
        assert_eq!(
            run("SELECT * FROM devices WHERE tags.site <> 'oslo'", &docs),
            ["c"]
        );
        assert_eq!(
            run(
                "SELECT * FROM devices WHERE NOT (tags.site = 'oslo')",
                &docs
            ),
            ["c"]
        );
        assert_eq!(
            run(
                "SELECT * FROM devices WHERE tags.site IN ['bergen', 'tromso']",
                &docs
            ),
            ["c"]
        );
        assert_eq!(
            run(
                "SELECT * FROM devices WHERE tags.site NIN ['bergen']",
                &docs
            ),
            ["a", "b"]
        );
        assert_eq!(
            run(
                "SELECT * FROM devices WHERE IS_DEFINED(properties.reported.fw)",
                &docs
            ),
            ["a", "b"]
        );
        assert_eq!(
            run(
                "SELECT * FROM devices WHERE NOT IS_DEFINED(tags.floor)",
                &docs
            ),
            ["c"]
        );
        // Undefined fields and mismatched types are neither true nor false.
        assert_eq!(
            run("SELECT * FROM devices WHERE tags.floor != 1", &docs),
            ["b"]
        );
        assert_eq!(
            run("SELECT * FROM devices WHERE tags.site > 3", &docs),
            Vec::<String>::new()
        );
        assert_eq!(run("SELECT * FROM devices", &docs).len(), 3);
    }

    #[test]
    fn parses_top_projections_counts_and_groups() {
        let q = parse("SELECT TOP 5 deviceId, properties.reported.fw AS firmware FROM devices")
            .unwrap();
        assert_eq!(q.top, Some(5));
        let Selection::Items(items) = &q.selection else {
            panic!()
        };
        let row = Doc(docs()[0].clone());
        assert_eq!(
            project(items, &row),
            json!({"deviceId": "a", "firmware": 2})
        );

        let q = parse("SELECT COUNT() AS total FROM devices WHERE tags.site = 'oslo'").unwrap();
        assert!(q.is_aggregate());
        let rows: Vec<Doc> = docs()
            .into_iter()
            .map(Doc)
            .filter(|d| matches(&q, d))
            .collect();
        assert_eq!(
            aggregate(&q, rows.iter().map(|d| d as &dyn Row)),
            vec![json!({"total": 2})]
        );

        let q = parse("SELECT tags.site, COUNT() FROM devices GROUP BY tags.site").unwrap();
        let rows: Vec<Doc> = docs().into_iter().map(Doc).collect();
        let groups = aggregate(&q, rows.iter().map(|d| d as &dyn Row));
        assert_eq!(
            groups,
            vec![
                json!({"site": "oslo", "$2": 2}),
                json!({"site": "bergen", "$2": 1})
            ]
        );
    }

    #[test]
    fn malformed_queries_name_the_position() {
        for (text, position, fragment) in [
            ("SELECT * FROM devices WHERE", 27, "expected"),
            (
                "SELECT * FROM devices WHERE tags.site = ",
                40,
                "expected a value",
            ),
            ("SELECT * FROM things", 14, "only FROM devices"),
            (
                "SELECT * FROM devices WHERE tags.site = 'oslo",
                40,
                "unterminated string",
            ),
            (
                "SELECT * FROM devices WHERE tags.site == 'x'",
                39,
                "expected a value",
            ),
            (
                "SELECT * FROM devices WHERE tags.site ~ 'x'",
                38,
                "unexpected character",
            ),
            (
                "SELECT TOP x * FROM devices",
                11,
                "TOP takes a whole number",
            ),
            ("SELEKT * FROM devices", 0, "expected SELECT"),
            (
                "SELECT * FROM devices WHERE (tags.a = 1",
                39,
                "expected ')'",
            ),
            ("SELECT * FROM devices extra", 22, "unexpected text"),
            ("SELECT deviceId, COUNT() FROM devices", 0, "need GROUP BY"),
            (
                "SELECT deviceId FROM devices GROUP BY tags.site",
                0,
                "not in GROUP BY",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.position, position, "{text}: {err}");
            assert!(err.message.contains(fragment), "{text}: {err}");
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! Arbitrary query text never panics the parser; errors always carry a position
    //! inside the text.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_text_never_panics_the_parser(text in "[ -~]{0,120}") {
            if let Err(err) = parse(&text) {
                prop_assert!(err.position <= text.chars().count());
            }
        }

        #[test]
        fn query_shaped_text_never_panics(
            field in "(tags|properties\\.reported|properties\\.desired)\\.[a-z]{1,5}",
            op in "(=|!=|<>|<|>|<=|>=| IN | NIN )",
            value in "('[a-z]{0,4}'|[0-9]{1,3}|true|\\['a', 1\\])",
            tail in "( AND | OR |)",
        ) {
            let text = format!("SELECT * FROM devices WHERE {field}{op}{value}{tail}");
            let _ = parse(&text);
        }
    }
}
