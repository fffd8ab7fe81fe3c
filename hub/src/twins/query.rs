//! The device query language (DESIGN section 3): a hand-written tokenizer and
//! recursive-descent parser for
//! `SELECT [TOP n] * | COUNT() [AS x] | fields FROM devices [WHERE …] [GROUP BY …]`
//! with `= != <> < > <= >= AND OR NOT IN NIN`, the type checks `IS_DEFINED()`,
//! `IS_ARRAY()`, `IS_BOOL()`, `IS_NULL()`, `IS_NUMBER()`, `IS_OBJECT()`,
//! `IS_PRIMITIVE()`, `IS_STRING()` and `STARTSWITH(x, y)`, `ENDSWITH(x, y)` (Azure's
//! twin query functions), and an evaluator over
//! rows that resolve dotted paths. Errors name the position in the query text.
//!
//! Comparisons follow the SQL-like rules of Azure's query language: a missing field
//! or values of different types compare as *undefined*, which is neither true nor
//! false; a row matches only when the condition is true.
//!
//! The text is untrusted (any `registry:read` token may send one), so the grammar
//! carries its own bounds: the query length, the nesting depth of parentheses and
//! `NOT`, the number of terms, and the length of a field path. `AND`/`OR` chains are
//! n-ary, so nothing here recurses deeper than [`MAX_DEPTH`] whatever the input.

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

/// The longest query text, in characters.
pub const MAX_QUERY_CHARS: usize = 64 * 1024;
/// How deeply parentheses and `NOT` may nest.
pub const MAX_DEPTH: usize = 20;
/// The most terms a query may hold: comparisons, `IN` values, `IS_DEFINED`, selected
/// fields and `GROUP BY` fields together.
pub const MAX_TERMS: usize = 500;
/// The most segments of a field path (twins nest at most 10 levels under
/// `properties.reported`).
pub const MAX_PATH_SEGMENTS: usize = 16;

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
    /// `a AND b AND …` (at least two terms; n-ary, so a long chain is flat).
    And(Vec<Expr>),
    /// `a OR b OR …` (at least two terms).
    Or(Vec<Expr>),
    /// `NOT a`.
    Not(Box<Expr>),
    /// `operand op operand`.
    Compare(Operand, CmpOp, Operand),
    /// `operand IN [...]` (or `NIN` when `negated`).
    In(Operand, Vec<Value>, bool),
    /// `IS_DEFINED(path)`.
    IsDefined(Path),
    /// `IS_ARRAY(path)`, `IS_STRING(path)`, …: whether the field is defined and of
    /// that type.
    IsType(TypeCheck, Path),
    /// `STARTSWITH(a, b)` or `ENDSWITH(a, b)` (`suffix`): undefined unless both are
    /// strings.
    StartsWith(Operand, Operand, bool),
}

/// The JSON type an `IS_*` function checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeCheck {
    /// `IS_ARRAY`
    Array,
    /// `IS_BOOL`
    Bool,
    /// `IS_NULL`
    Null,
    /// `IS_NUMBER`
    Number,
    /// `IS_OBJECT`
    Object,
    /// `IS_PRIMITIVE`: string, number, boolean or null.
    Primitive,
    /// `IS_STRING`
    String,
}

impl TypeCheck {
    const ALL: [(&'static str, TypeCheck); 7] = [
        ("IS_ARRAY", TypeCheck::Array),
        ("IS_BOOL", TypeCheck::Bool),
        ("IS_NULL", TypeCheck::Null),
        ("IS_NUMBER", TypeCheck::Number),
        ("IS_OBJECT", TypeCheck::Object),
        ("IS_PRIMITIVE", TypeCheck::Primitive),
        ("IS_STRING", TypeCheck::String),
    ];

    fn matches(self, value: &Value) -> bool {
        match self {
            TypeCheck::Array => value.is_array(),
            TypeCheck::Bool => value.is_boolean(),
            TypeCheck::Null => value.is_null(),
            TypeCheck::Number => value.is_number(),
            TypeCheck::Object => value.is_object(),
            TypeCheck::Primitive => !value.is_array() && !value.is_object(),
            TypeCheck::String => value.is_string(),
        }
    }
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
    /// Terms parsed so far (bounded by [`MAX_TERMS`]).
    terms: usize,
}

impl Parser {
    /// A parser over `text` (a `what`: query or condition), refused past
    /// [`MAX_QUERY_CHARS`].
    fn new(text: &str, what: &str) -> Result<Self, QueryError> {
        let end = text.chars().count();
        if end > MAX_QUERY_CHARS {
            return Err(QueryError {
                position: MAX_QUERY_CHARS,
                message: format!("{what} too long: at most {MAX_QUERY_CHARS} characters"),
            });
        }
        Ok(Self {
            tokens: tokenize(text)?,
            at: 0,
            end,
            terms: 0,
        })
    }

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

    /// Counts one more term, refusing the query past [`MAX_TERMS`].
    fn term(&mut self, position: usize) -> Result<(), QueryError> {
        self.terms += 1;
        if self.terms > MAX_TERMS {
            return Err(QueryError {
                position,
                message: format!("too many terms: a query may hold at most {MAX_TERMS}"),
            });
        }
        Ok(())
    }

    /// One level deeper into parentheses or `NOT`, refusing past [`MAX_DEPTH`].
    fn deeper(&self, depth: usize) -> Result<usize, QueryError> {
        if depth >= MAX_DEPTH {
            return self.error(format!(
                "nested too deeply: parentheses and NOT may nest at most {MAX_DEPTH} levels"
            ));
        }
        Ok(depth + 1)
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
            if path.len() == MAX_PATH_SEGMENTS {
                return self.error(format!(
                    "field path too long: at most {MAX_PATH_SEGMENTS} segments"
                ));
            }
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
            Some(self.or(0)?)
        } else {
            None
        };
        let mut group_by = Vec::new();
        if self.keyword("GROUP") {
            self.expect_keyword("BY")?;
            loop {
                self.term(self.position())?;
                group_by.push(self.path()?);
                if !self.symbol(",") {
                    break;
                }
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
        self.term(self.position())?;
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

    fn or(&mut self, depth: usize) -> Result<Expr, QueryError> {
        self.chain("OR", depth, Self::and, Expr::Or)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, QueryError> {
        self.chain("AND", depth, Self::not, Expr::And)
    }

    /// `term (keyword term)*` as one n-ary node (or the lone term), so a long chain
    /// is flat rather than deep.
    fn chain(
        &mut self,
        keyword: &str,
        depth: usize,
        term: fn(&mut Self, usize) -> Result<Expr, QueryError>,
        node: fn(Vec<Expr>) -> Expr,
    ) -> Result<Expr, QueryError> {
        let mut terms = vec![term(self, depth)?];
        while self.keyword(keyword) {
            terms.push(term(self, depth)?);
        }
        Ok(if terms.len() == 1 {
            terms.swap_remove(0)
        } else {
            node(terms)
        })
    }

    fn not(&mut self, depth: usize) -> Result<Expr, QueryError> {
        if matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case("NOT")) {
            let depth = self.deeper(depth)?;
            self.at += 1;
            return Ok(Expr::Not(Box::new(self.not(depth)?)));
        }
        self.comparison(depth)
    }

    fn comparison(&mut self, depth: usize) -> Result<Expr, QueryError> {
        if matches!(self.peek(), Some(Token::Sym("("))) {
            let depth = self.deeper(depth)?;
            self.at += 1;
            let inner = self.or(depth)?;
            self.expect_symbol(")")?;
            return Ok(inner);
        }
        self.term(self.position())?;
        if self.keyword("IS_DEFINED") {
            self.expect_symbol("(")?;
            let path = self.path()?;
            self.expect_symbol(")")?;
            return Ok(Expr::IsDefined(path));
        }
        for (name, check) in TypeCheck::ALL {
            if self.keyword(name) {
                self.expect_symbol("(")?;
                let path = self.path()?;
                self.expect_symbol(")")?;
                return Ok(Expr::IsType(check, path));
            }
        }
        for (name, suffix) in [("STARTSWITH", false), ("ENDSWITH", true)] {
            if self.keyword(name) {
                self.expect_symbol("(")?;
                let text = self.operand()?;
                self.expect_symbol(",")?;
                let affix = self.operand()?;
                self.expect_symbol(")")?;
                return Ok(Expr::StartsWith(text, affix, suffix));
            }
        }
        let left = self.operand()?;
        for (keyword, negated) in [("IN", false), ("NIN", true)] {
            if self.keyword(keyword) {
                self.expect_symbol("[")?;
                let mut values = vec![self.literal()?];
                while self.symbol(",") {
                    self.term(self.position())?;
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
        "IS_ARRAY",
        "IS_BOOL",
        "IS_NULL",
        "IS_NUMBER",
        "IS_OBJECT",
        "IS_PRIMITIVE",
        "IS_STRING",
        "STARTSWITH",
        "ENDSWITH",
    ]
    .iter()
    .any(|w| word.eq_ignore_ascii_case(w))
}

/// Parses a query.
pub fn parse(text: &str) -> Result<Query, QueryError> {
    let mut parser = Parser::new(text, "query")?;
    let query = parser.query()?;
    query.validate()?;
    Ok(query)
}

/// Parses a bare condition (the `WHERE` part alone, as routing conditions are
/// written), with the same bounds as a query.
pub fn parse_condition(text: &str) -> Result<Expr, QueryError> {
    let mut parser = Parser::new(text, "condition")?;
    let condition = parser.or(0)?;
    if parser.at < parser.tokens.len() {
        return parser.error("unexpected text after the condition");
    }
    Ok(condition)
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
        // Recursion is bounded by MAX_DEPTH: chains are n-ary.
        fn walk<'a>(expr: &'a Expr, out: &mut Vec<&'a Path>) {
            match expr {
                Expr::And(terms) | Expr::Or(terms) => {
                    for term in terms {
                        walk(term, out);
                    }
                }
                Expr::Not(a) => walk(a, out),
                Expr::Compare(l, _, r) => {
                    for side in [l, r] {
                        if let Operand::Field(p) = side {
                            out.push(p);
                        }
                    }
                }
                Expr::In(Operand::Field(p), _, _) | Expr::IsDefined(p) | Expr::IsType(_, p) => {
                    out.push(p)
                }
                Expr::StartsWith(l, r, _) => {
                    for side in [l, r] {
                        if let Operand::Field(p) = side {
                            out.push(p);
                        }
                    }
                }
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
    let mut value = map.get(first)?;
    for segment in rest {
        value = value.as_object()?.get(segment)?;
    }
    Some(value)
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

/// Three-valued evaluation: `None` is undefined. Recursion is bounded by
/// [`MAX_DEPTH`]: chains are n-ary.
pub fn evaluate(expr: &Expr, row: &dyn Row) -> Option<bool> {
    match expr {
        // false wins over undefined, which wins over true.
        Expr::And(terms) => {
            let mut result = Some(true);
            for term in terms {
                match evaluate(term, row) {
                    Some(false) => return Some(false),
                    Some(true) => {}
                    None => result = None,
                }
            }
            result
        }
        // true wins over undefined, which wins over false.
        Expr::Or(terms) => {
            let mut result = Some(false);
            for term in terms {
                match evaluate(term, row) {
                    Some(true) => return Some(true),
                    Some(false) => {}
                    None => result = None,
                }
            }
            result
        }
        Expr::Not(a) => evaluate(a, row).map(|v| !v),
        Expr::IsDefined(path) => Some(row.get(path).is_some()),
        Expr::IsType(check, path) => Some(row.get(path).is_some_and(|v| check.matches(&v))),
        Expr::StartsWith(text, affix, suffix) => {
            let (Value::String(text), Value::String(affix)) =
                (operand(row, text)?, operand(row, affix)?)
            else {
                return None;
            };
            Some(match suffix {
                false => text.starts_with(&affix),
                true => text.ends_with(&affix),
            })
        }
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
    // Groups keep the order in which they first appear; the index finds a row's
    // group by its key's JSON text, so grouping is linear in the rows.
    let mut groups: Vec<(Vec<Option<Value>>, u64)> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for row in rows {
        let key: Vec<Option<Value>> = query.group_by.iter().map(|p| row.get(p)).collect();
        let text = serde_json::to_string(&key).unwrap_or_default();
        match index.get(&text) {
            Some(&at) => groups[at].1 += 1,
            None => {
                index.insert(text, groups.len());
                groups.push((key, 1));
            }
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
    fn string_prefix_suffix_and_type_functions() {
        let docs = vec![
            json!({"deviceId": "sensor-1", "tags": {"site": "oslo-west", "list": [1], "n": null}}),
            json!({"deviceId": "sensor-2", "tags": {"site": "bergen", "list": {"a": 1}, "n": 3}}),
            json!({"deviceId": "pump-1", "tags": {"site": 7}}),
        ];
        let q = |where_: &str| run(&format!("SELECT * FROM devices WHERE {where_}"), &docs);
        assert_eq!(
            q("STARTSWITH(deviceId, 'sensor-')"),
            ["sensor-1", "sensor-2"]
        );
        assert_eq!(q("startswith(tags.site, 'oslo')"), ["sensor-1"]);
        assert_eq!(q("ENDSWITH(deviceId, '-1')"), ["sensor-1", "pump-1"]);
        // A number is not a string: undefined, so NOT does not match it either.
        assert_eq!(q("NOT STARTSWITH(tags.site, 'b')"), ["sensor-1"]);
        assert_eq!(q("IS_ARRAY(tags.list)"), ["sensor-1"]);
        assert_eq!(q("IS_OBJECT(tags.list)"), ["sensor-2"]);
        assert_eq!(q("IS_NULL(tags.n)"), ["sensor-1"]);
        assert_eq!(q("IS_NUMBER(tags.n)"), ["sensor-2"]);
        assert_eq!(q("IS_STRING(tags.site)"), ["sensor-1", "sensor-2"]);
        assert_eq!(q("IS_BOOL(tags.site)"), Vec::<String>::new());
        assert_eq!(
            q("IS_PRIMITIVE(tags.n)"),
            ["sensor-1", "sensor-2"],
            "null and numbers are primitive; a missing field is not"
        );
        assert!(parse("SELECT * FROM devices WHERE STARTSWITH(deviceId)").is_err());
        assert!(parse("SELECT * FROM devices WHERE IS_STRING('x')").is_err());
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
mod bounds {
    //! Hostile query text: deep nesting, long chains, long paths. Each runs on a
    //! thread with a small stack, so any recursion proportional to the input would
    //! overflow it instead of passing.
    use super::*;

    const PREFIX: &str = "SELECT * FROM devices WHERE ";

    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(f)
            .expect("spawn")
            .join()
            .expect("the parser overflowed or panicked")
    }

    fn parse_and_drop(text: String) -> Result<(), QueryError> {
        on_small_stack(move || parse(&text).map(drop))
    }

    #[test]
    fn deep_parentheses_are_refused_at_the_first_level_too_deep() {
        let text = format!("{PREFIX}{}a = 1{}", "(".repeat(5000), ")".repeat(5000));
        let err = parse_and_drop(text).unwrap_err();
        assert_eq!(err.position, PREFIX.len() + MAX_DEPTH, "{err}");
        assert!(err.message.contains("nested too deeply"), "{err}");

        let text = format!(
            "{PREFIX}{}a = 1{}",
            "(".repeat(MAX_DEPTH),
            ")".repeat(MAX_DEPTH)
        );
        parse_and_drop(text).expect("the deepest allowed nesting parses");
    }

    #[test]
    fn long_not_chains_are_refused() {
        let text = format!("{PREFIX}{}a = 1", "NOT ".repeat(10_000));
        let err = parse_and_drop(text).unwrap_err();
        assert_eq!(err.position, PREFIX.len() + 4 * MAX_DEPTH, "{err}");
    }

    #[test]
    fn long_and_or_chains_are_refused_past_the_term_limit() {
        let chain = |n: usize, op: &str| {
            let terms: Vec<&str> = std::iter::repeat_n("a = 1", n).collect();
            format!("{PREFIX}{}", terms.join(op))
        };
        let err = parse_and_drop(chain(6_000, " AND ")).unwrap_err();
        assert!(err.message.contains("too many terms"), "{err}");
        // The first term past the limit is where the error points.
        assert_eq!(err.position, PREFIX.len() + MAX_TERMS * "a = 1 AND ".len());
        assert!(parse_and_drop(chain(6_000, " OR ")).is_err());

        // At the limit, the chain parses flat and evaluates without recursion.
        let text = chain(MAX_TERMS, " AND ");
        let query = parse(&text).expect("a chain at the limit parses");
        let Some(Expr::And(terms)) = &query.filter else {
            panic!("an AND chain is one n-ary node: {:?}", query.filter)
        };
        assert_eq!(terms.len(), MAX_TERMS);
    }

    #[test]
    fn long_in_lists_select_lists_and_paths_are_bounded() {
        let values: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
        let text = format!("{PREFIX}a IN [{}]", values.join(","));
        assert!(
            parse_and_drop(text)
                .unwrap_err()
                .message
                .contains("too many terms")
        );

        let fields: Vec<&str> = std::iter::repeat_n("tags.a", 5000).collect();
        let text = format!("SELECT {} FROM devices", fields.join(", "));
        assert!(
            parse_and_drop(text)
                .unwrap_err()
                .message
                .contains("too many terms")
        );

        let path = vec!["a"; 10_000].join(".");
        let err = parse_and_drop(format!("{PREFIX}{path} = 1")).unwrap_err();
        assert!(err.message.contains("field path too long"), "{err}");
    }

    #[test]
    fn overlong_text_is_refused_before_tokenizing() {
        let text = format!("{PREFIX}a = '{}'", "x".repeat(MAX_QUERY_CHARS));
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("query too long"), "{err}");
    }

    #[test]
    fn grouping_many_distinct_keys_is_linear() {
        // 20,000 distinct groups: a quadratic search would take ~2×10^8 comparisons.
        struct Numbered(u64);
        impl Row for Numbered {
            fn get(&self, path: &[String]) -> Option<Value> {
                (path.first().map(String::as_str) == Some("n")).then(|| Value::from(self.0))
            }
        }
        let query = parse("SELECT n, COUNT() AS c FROM devices GROUP BY n").expect("parses");
        let rows: Vec<Numbered> = (0..20_000).chain(0..10).map(Numbered).collect();
        let groups = aggregate(&query, rows.iter().map(|r| r as &dyn Row));
        assert_eq!(groups.len(), 20_000);
        assert_eq!(groups[3], serde_json::json!({"n": 3, "c": 2}));
        assert_eq!(groups[19_999], serde_json::json!({"n": 19_999, "c": 1}));
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any mix of `(` and `NOT` nests: accepted up to MAX_DEPTH, refused with a
        /// position inside the text beyond it, never a stack overflow.
        #[test]
        fn nesting_of_any_depth_is_parsed_or_refused(
            opens in proptest::collection::vec(any::<bool>(), 0..3000),
        ) {
            let mut text = String::from("SELECT * FROM devices WHERE ");
            let mut closes = 0;
            for paren in &opens {
                if *paren {
                    text.push('(');
                    closes += 1;
                } else {
                    text.push_str("NOT ");
                }
            }
            text.push_str("tags.a = 1");
            text.push_str(&")".repeat(closes));
            let len = text.chars().count();
            let result = std::thread::Builder::new()
                .stack_size(512 * 1024)
                .spawn(move || parse(&text).map(drop))
                .expect("spawn")
                .join()
                .expect("no overflow");
            match result {
                Ok(()) => prop_assert!(opens.len() <= MAX_DEPTH),
                Err(err) => {
                    prop_assert!(opens.len() > MAX_DEPTH, "{}", err);
                    prop_assert!(err.position <= len);
                }
            }
        }

        /// Chains of any length with any mix of AND and OR: accepted up to
        /// MAX_TERMS terms, refused beyond.
        #[test]
        fn chains_of_any_length_are_parsed_or_refused(
            ops in proptest::collection::vec(any::<bool>(), 0..2000),
        ) {
            let mut text = String::from("SELECT * FROM devices WHERE tags.a = 1");
            for and in &ops {
                text.push_str(if *and { " AND tags.b != 'x'" } else { " OR tags.c < 3" });
            }
            let result = std::thread::Builder::new()
                .stack_size(512 * 1024)
                .spawn(move || parse(&text).map(drop))
                .expect("spawn")
                .join()
                .expect("no overflow");
            prop_assert_eq!(result.is_ok(), ops.len() < MAX_TERMS);
        }
    }
}
