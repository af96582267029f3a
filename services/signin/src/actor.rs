//! Flow actors: one ractor actor per sign-in that is being worked on, under a supervisor.
//!
//! ```text
//!   gRPC handler ──Flows::call(id)──▶ registry "signin-<id>" ──▶ FlowActor (one per flow)
//!                                       │ not found: spawn_linked under FlowSupervisor,
//!                                       │ pre_start rebuilds the flow from its events
//!                                       ▼
//!                                  Engine::handle (decide, append at the exact version)
//!   Deadlines (live view of open flows) ── overdue ──▶ Flows::call(id, Expire)
//! ```
//!
//! The actor is the flow's single writer in this process: commands for one flow run one at a
//! time, in order, against state held in memory. Across processes the exact-version append
//! decides: a process whose copy is stale loses the append, reloads, and answers from the new
//! state — which is also how a flow started on one replica is continued on another, and how
//! one survives a restart (its actor is rebuilt from the log on the next message).
//!
//! A flow waiting for a person (typing a code) needs no actor: after [`Flows::idle`] without a
//! message the actor stops, leaving only its events and one deadline entry (well under the
//! 2 KiB per pending flow budget). The next message starts it again. An actor that fails is
//! replaced the same way; the supervisor only logs.

use crate::engine::{Command, Engine, Reply, Scope};
use crate::flow::SignIn;
use chrono::{DateTime, Utc};
use gatehouse_core::ApiError;
use gatehouse_events::view::LiveView;
use gatehouse_events::{
    Aggregate, EventFilter, EventStore, Loaded, Metadata, RecordedEvent, StoreError,
};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// How long a flow's answer may take before the caller gets an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A message to a flow actor.
pub enum FlowMsg {
    /// Run a command and answer.
    Command(Box<Request>),
    /// Stop if nothing happened since the message numbered so.
    Idle(u64),
}

/// A command with who asks and where the answer goes.
pub struct Request {
    /// What to do.
    command: Command,
    /// Who asks.
    scope: Scope,
    /// Event metadata (client context, correlation id).
    metadata: Metadata,
    /// Where the answer goes.
    reply: RpcReplyPort<Result<Reply, ApiError>>,
}

/// The actor of one flow.
pub struct FlowActor {
    engine: Arc<Engine>,
    idle: Duration,
}

/// Its state: the flow, loaded on the first message.
pub struct FlowState {
    id: Uuid,
    flow: Option<Loaded<SignIn>>,
    messages: u64,
}

impl Actor for FlowActor {
    type Msg = FlowMsg;
    type State = FlowState;
    type Arguments = Uuid;

    async fn pre_start(
        &self,
        _myself: ActorRef<FlowMsg>,
        id: Uuid,
    ) -> Result<FlowState, ActorProcessingErr> {
        Ok(FlowState {
            id,
            flow: None,
            messages: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<FlowMsg>,
        message: FlowMsg,
        state: &mut FlowState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            FlowMsg::Command(request) => {
                let Request {
                    command,
                    scope,
                    metadata,
                    reply,
                } = *request;
                state.messages += 1;
                let result = self.run(state, command, &scope, &metadata).await;
                // Ended, or never existed (a mistyped id must not leave an actor behind).
                let ended = state
                    .flow
                    .as_ref()
                    .is_none_or(|f| f.version == 0 || f.state.outcome.is_some());
                let _ = reply.send(result);
                if ended {
                    myself.stop(None);
                } else {
                    let seen = state.messages;
                    myself.send_after(self.idle, move || FlowMsg::Idle(seen));
                }
            }
            FlowMsg::Idle(seen) => {
                if seen == state.messages {
                    myself.stop(None);
                }
            }
        }
        Ok(())
    }
}

impl FlowActor {
    async fn run(
        &self,
        state: &mut FlowState,
        command: Command,
        scope: &Scope,
        metadata: &Metadata,
    ) -> Result<Reply, ApiError> {
        // A provider's code is single-use: CompleteFederation is decided once, from the log
        // (a retry after a lost race would redeem the code again and be refused).
        let once = matches!(command, Command::CompleteFederation(_));
        // A read is answered from the log, not the copy: another process may have moved on.
        if matches!(command, Command::Get) || once {
            state.flow = None;
        }
        let mut result = Err(ApiError::Aborted);
        for _ in 0..if once { 1 } else { 2 } {
            let mut flow = match state.flow.take() {
                // The copy may be behind: another replica may have run the flow's last step.
                Some(mut flow) => {
                    flow.refresh(self.engine.store().as_ref()).await?;
                    flow
                }
                None => Loaded::<SignIn>::load(self.engine.store().as_ref(), state.id).await?,
            };
            result = self
                .engine
                .handle(state.id, &mut flow, command.clone(), scope, metadata)
                .await;
            match result {
                // The copy was stale (another process appended): reload and decide again.
                Err(ApiError::Aborted) => continue,
                Err(ApiError::Internal(_)) => return result,
                _ => {
                    state.flow = Some(flow);
                    return result;
                }
            }
        }
        result
    }
}

/// Supervises the flow actors: a failed actor is logged; its flow lives on in the log.
pub struct FlowSupervisor;

impl Actor for FlowSupervisor {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<()>,
        event: SupervisionEvent,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(actor, error) = event {
            tracing::warn!(actor = ?actor.get_name(), %error, "sign-in flow actor failed");
        }
        Ok(())
    }
}

/// The flows of this process: finds or starts a flow's actor and talks to it.
pub struct Flows {
    engine: Arc<Engine>,
    supervisor: ActorRef<()>,
    idle: Duration,
}

fn name(id: Uuid) -> String {
    format!("signin-{id}")
}

impl Flows {
    /// Starts the supervisor. `idle`: how long an actor outlives its last message.
    pub async fn start(engine: Arc<Engine>, idle: Duration) -> Result<Self, SpawnErr> {
        let (supervisor, _) = Actor::spawn(None, FlowSupervisor, ()).await?;
        Ok(Flows {
            engine,
            supervisor,
            idle,
        })
    }

    async fn actor(&self, id: Uuid) -> Result<ActorRef<FlowMsg>, ApiError> {
        loop {
            if let Some(actor) = ActorRef::<FlowMsg>::where_is(name(id)) {
                return Ok(actor);
            }
            let actor = FlowActor {
                engine: self.engine.clone(),
                idle: self.idle,
            };
            match Actor::spawn_linked(Some(name(id)), actor, id, self.supervisor.get_cell()).await {
                Ok((actor, _)) => return Ok(actor),
                // Another request started it first: use that one.
                Err(SpawnErr::ActorAlreadyRegistered(_)) => continue,
                Err(error) => return Err(ApiError::Internal(error.to_string())),
            }
        }
    }

    /// Runs a command on flow `id` through its actor.
    pub async fn call(
        &self,
        id: Uuid,
        command: Command,
        scope: Scope,
        metadata: Metadata,
    ) -> Result<Reply, ApiError> {
        // An actor may stop (idle) between being found and being called; the message then
        // comes back undelivered and a fresh actor takes it.
        for _ in 0..5 {
            let actor = self.actor(id).await?;
            let (command, scope, metadata) = (command.clone(), scope.clone(), metadata.clone());
            let sent = actor
                .call(
                    |reply| {
                        FlowMsg::Command(Box::new(Request {
                            command,
                            scope,
                            metadata,
                            reply,
                        }))
                    },
                    Some(CALL_TIMEOUT),
                )
                .await;
            match sent {
                Ok(CallResult::Success(result)) => return result,
                Ok(CallResult::Timeout) => {
                    return Err(ApiError::Internal("sign-in step timed out".into()));
                }
                Ok(CallResult::SenderError) | Err(_) => tokio::task::yield_now().await,
            }
        }
        Err(ApiError::Aborted)
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        self.supervisor.stop(None);
    }
}

/// Open flows and their deadlines, from the log (so a restarted process knows them).
#[derive(Default)]
pub struct OpenFlows {
    by_id: HashMap<Uuid, (Uuid, DateTime<Utc>)>,
    by_deadline: BTreeSet<(DateTime<Utc>, Uuid)>,
}

impl OpenFlows {
    fn overdue(&self, now: DateTime<Utc>) -> Vec<(Uuid, Uuid)> {
        self.by_deadline
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .filter_map(|(_, id)| self.by_id.get(id).map(|(tenant, _)| (*id, *tenant)))
            .collect()
    }
}

fn track(open: &mut OpenFlows, event: &RecordedEvent) {
    let id = event.stream.id;
    match event.event_type.as_str() {
        "SignInStarted" => {
            #[derive(serde::Deserialize)]
            struct Started {
                expires_at: DateTime<Utc>,
            }
            if let Ok(started) = event.payload_as::<Started>() {
                open.by_id.insert(id, (event.tenant_id, started.expires_at));
                open.by_deadline.insert((started.expires_at, id));
            }
        }
        "SignInCompleted" | "SignInFailed" | "SignInExpired" | "SignInCancelled" => {
            if let Some((_, deadline)) = open.by_id.remove(&id) {
                open.by_deadline.remove(&(deadline, id));
            }
        }
        _ => {}
    }
}

/// Ends overdue flows with `SignInExpired`, in every process that runs it (the exact-version
/// append lets one win).
pub struct Deadlines {
    task: tokio::task::JoinHandle<()>,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Deadlines {
    /// Catches up with the open flows, then checks every `tick`.
    pub async fn start(
        store: Arc<dyn EventStore>,
        flows: Arc<Flows>,
        tick: Duration,
    ) -> Result<Self, StoreError> {
        let filter = EventFilter {
            stream_types: vec![SignIn::STREAM_TYPE.into()],
            ..EventFilter::default()
        };
        let view = LiveView::start(store, filter, OpenFlows::default(), track).await?;
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = open.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let (overdue, in_flight) =
                    view.read(|open| (open.overdue(Utc::now()), open.by_id.len()));
                count.store(in_flight, std::sync::atomic::Ordering::Relaxed);
                for (id, tenant_id) in overdue {
                    let scope = Scope {
                        tenant_id,
                        client_id: None,
                    };
                    let result = flows
                        .call(id, Command::Expire, scope, Metadata::system())
                        .await;
                    if let Err(error) = result {
                        tracing::warn!(%id, %error, "could not expire a sign-in");
                    }
                }
            }
        });
        Ok(Deadlines { task, open })
    }

    /// Flows started and not ended, across every process (as of the last tick).
    pub fn open_flows(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        self.open.clone()
    }
}

impl Drop for Deadlines {
    fn drop(&mut self) {
        self.task.abort();
    }
}
