//! Events per type: the smallest projection that still touches every event.

use crate::Projection;
use gatehouse_events::RecordedEvent;
use std::collections::HashMap;

/// How many events of each type the log holds, and the last position seen.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventCounts {
    /// Count per event type.
    pub by_type: HashMap<String, u64>,
    /// Highest position folded.
    pub last_position: u64,
}

impl Projection for EventCounts {
    fn apply(&mut self, event: &RecordedEvent) {
        match self.by_type.get_mut(&event.event_type) {
            Some(count) => *count += 1,
            None => {
                self.by_type.insert(event.event_type.clone(), 1);
            }
        }
        self.last_position = event.position;
    }
}
