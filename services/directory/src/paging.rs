//! Paging through the directory's in-memory views: every List RPC reads `page_size` and
//! `page_token` (the last id of the previous page; ids are UUIDv7, so id order is creation
//! order) the same way.

use crate::tenant_service::parse_id;
use gatehouse_core::ApiError;
use std::collections::BTreeMap;
use std::ops::Bound;
use uuid::Uuid;

/// Largest page.
pub const MAX_PAGE: usize = 500;
/// Page size when the caller leaves it 0.
pub const DEFAULT_PAGE: usize = 100;

/// A checked page request.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Rows per page.
    pub size: usize,
    /// Resume after this id.
    pub after: Option<Uuid>,
}

impl Page {
    /// Reads and checks a request's paging fields.
    pub fn parse(page_size: u32, page_token: &str) -> Result<Page, ApiError> {
        let size = match page_size as usize {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(ApiError::invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE}"),
                ));
            }
            n => n,
        };
        let after = match page_token {
            "" => None,
            token => Some(parse_id("page_token", token)?),
        };
        Ok(Page { size, after })
    }

    /// The entries of `map` after the token, in id order.
    pub fn entries<'a, V>(
        &self,
        map: &'a BTreeMap<Uuid, V>,
    ) -> impl Iterator<Item = (&'a Uuid, &'a V)> {
        let start = match self.after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        map.range((start, Bound::Unbounded))
    }

    /// One page of `map` and the token of the next page (empty when there is none).
    pub fn take<V: Clone>(&self, map: &BTreeMap<Uuid, V>) -> (Vec<(Uuid, V)>, String) {
        let mut rows: Vec<(Uuid, V)> = self
            .entries(map)
            .take(self.size + 1)
            .map(|(id, row)| (*id, row.clone()))
            .collect();
        let more = rows.len() > self.size;
        rows.truncate(self.size);
        let next = match (more, rows.last()) {
            (true, Some((last, _))) => last.to_string(),
            _ => String::new(),
        };
        (rows, next)
    }
}
