//! Read-model tables beside the log: what projections write, in the store's own database, so
//! that a projection's rows and its checkpoint commit in one transaction.
//!
//! Projections speak one small dialect that PostgreSQL and SQLite both understand: `?`
//! placeholders (rewritten to `$1, $2, …` for PostgreSQL), integer and text values only (times
//! as microseconds, ids as text), `INSERT … ON CONFLICT … DO UPDATE/NOTHING`, and aggregates
//! cast to `BIGINT`.

/// A value bound to or read from a read-model statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SqlValue {
    /// A 64-bit integer (counts, positions, times in microseconds).
    Int(i64),
    /// Text (ids, names).
    Text(String),
}

impl SqlValue {
    /// The integer, or 0 for text.
    pub fn int(&self) -> i64 {
        match self {
            SqlValue::Int(value) => *value,
            SqlValue::Text(_) => 0,
        }
    }

    /// The text, or the integer as text.
    pub fn text(&self) -> String {
        match self {
            SqlValue::Int(value) => value.to_string(),
            SqlValue::Text(text) => text.clone(),
        }
    }
}

impl From<i64> for SqlValue {
    fn from(value: i64) -> Self {
        SqlValue::Int(value)
    }
}

impl From<&str> for SqlValue {
    fn from(value: &str) -> Self {
        SqlValue::Text(value.to_string())
    }
}

impl From<String> for SqlValue {
    fn from(value: String) -> Self {
        SqlValue::Text(value)
    }
}

/// One statement and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// SQL with `?` placeholders.
    pub sql: String,
    /// One value per placeholder, in order.
    pub params: Vec<SqlValue>,
}

impl Statement {
    /// A statement.
    pub fn new(sql: impl Into<String>, params: Vec<SqlValue>) -> Self {
        Statement {
            sql: sql.into(),
            params,
        }
    }
}

/// `?` placeholders as PostgreSQL's `$1, $2, …` (read-model SQL never has `?` in literals).
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_numbered_in_order() {
        assert_eq!(
            super::numbered("SELECT a FROM t WHERE b = ? AND c IN (?, ?)"),
            "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3)"
        );
    }
}
