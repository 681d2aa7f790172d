//! `gantry events [-w]`, and following the Events stream for the other verbs: a watch that
//! resumes after a lost connection from the last revision seen, and skips to the oldest kept
//! revision when its start has been compacted.
//!
//! The API has no call that lists past events, so past events are read by watching from an
//! earlier revision and stopping once the stream has caught up: at the first event at or past
//! the head revision, at a BOOKMARK, or after [`CAUGHT_UP_IDLE`] without an event (the stream
//! does not say when it has caught up if the last events before the head are filtered out).

use std::time::{Duration, SystemTime};

use clap::Args;
use gantry::client::Client;
use gantry::pb;
use tonic::Code;

use super::error::{self, UsageError};
use super::output::{self, Format, OutputArgs, Table, Tone};
use super::view::{self, EventDoc, List};
use super::{Ctx, print};

/// How many revisions back `gantry events` and `describe` look by default.
pub const HISTORY_WINDOW: i64 = 10_000;
/// A replay of past events that sees nothing for this long has caught up.
pub const CAUGHT_UP_IDLE: Duration = Duration::from_millis(400);
/// How long a watch keeps trying to reconnect before it gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(30);
/// Trailing metadata of OUT_OF_RANGE: the oldest revision still kept.
const COMPACT_REVISION_METADATA: &str = "gantry-compact-revision";

/// `gantry events`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Keep printing events as they happen.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Start at this store revision (default: the last 10000 revisions, or with -w only new
    /// events).
    #[arg(long, value_name = "R")]
    pub since_revision: Option<i64>,
    /// Also show object changes (created, updated, deleted), not only notices.
    #[arg(long)]
    pub all: bool,
    /// Only events about this workload and its instances.
    #[arg(long, value_name = "NAME")]
    pub workload: Option<String>,
    /// Only events about this node and the instances on it.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// What [`Follow::next`] yields.
#[derive(Debug)]
pub enum Next {
    /// An event (BOOKMARKs included: they say how far the stream is complete).
    Event(Box<pb::Event>),
    /// The revisions from where the watch was to start up to `oldest` have been compacted;
    /// the watch goes on from `oldest`. A follower of objects should re-read them.
    Compacted {
        /// The oldest revision kept.
        oldest: i64,
    },
}

/// A resumable watch of the Events stream.
pub struct Follow {
    client: Client,
    request: pb::WatchRequest,
    stream: Option<tonic::Streaming<pb::Event>>,
}

impl Follow {
    /// A watch of `request` (which names the first revision), opened on first use.
    pub fn new(client: Client, request: pb::WatchRequest) -> Self {
        Follow {
            client,
            request,
            stream: None,
        }
    }

    /// The next event, reconnecting when the connection is lost (for up to 30 s).
    pub async fn next(&mut self) -> anyhow::Result<Next> {
        let mut lost_since: Option<std::time::Instant> = None;
        let mut delay = Duration::from_millis(100);
        loop {
            let failure = match &mut self.stream {
                None => match self
                    .client
                    .events()
                    .watch(tonic::Request::new(self.request.clone()))
                    .await
                {
                    Ok(response) => {
                        self.stream = Some(response.into_inner());
                        continue;
                    }
                    Err(status) => status,
                },
                Some(stream) => match stream.message().await {
                    Ok(Some(event)) => {
                        self.request.from_revision = event.revision + 1;
                        return Ok(Next::Event(Box::new(event)));
                    }
                    // The server ended the stream without an error: open it again.
                    Ok(None) => tonic::Status::unavailable("the event stream ended"),
                    Err(status) => status,
                },
            };
            self.stream = None;
            match failure.code() {
                Code::OutOfRange => {
                    if let Some(oldest) = compact_revision(&failure) {
                        self.request.from_revision = oldest;
                        return Ok(Next::Compacted { oldest });
                    }
                    return Err(error::api(failure, self.client.address()));
                }
                Code::Unavailable | Code::Unknown | Code::Internal
                    if lost_since.is_none_or(|t| t.elapsed() < RECONNECT_FOR) =>
                {
                    if lost_since.is_none() {
                        eprintln!(
                            "warning: lost the event stream ({}); resuming from revision {}",
                            failure.message(),
                            self.request.from_revision
                        );
                    }
                    lost_since.get_or_insert_with(std::time::Instant::now);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                _ => return Err(error::api(failure, self.client.address())),
            }
        }
    }
}

/// The oldest kept revision that an OUT_OF_RANGE status names.
fn compact_revision(status: &tonic::Status) -> Option<i64> {
    status
        .metadata()
        .get(COMPACT_REVISION_METADATA)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The store revision now (of a cheap List).
pub async fn head_revision(client: &Client) -> anyhow::Result<i64> {
    let request = pb::ListNodesRequest {
        label_selector: String::new(),
        page_size: 1,
        page_token: String::new(),
    };
    let response = client
        .nodes()
        .list(client.request(request))
        .await
        .map_err(|s| error::api(s, client.address()))?;
    Ok(response.into_inner().revision)
}

/// Reads `follow` until it has caught up with `head` (see the module doc), and returns what it
/// read, in order, without bookmarks. The last event may be past `head`: it was read, so a
/// caller that goes on following must use it.
pub async fn catch_up(follow: &mut Follow, head: i64) -> anyhow::Result<Vec<pb::Event>> {
    let mut events = Vec::new();
    if follow.request.from_revision > head {
        return Ok(events);
    }
    loop {
        let next = match tokio::time::timeout(CAUGHT_UP_IDLE, follow.next()).await {
            Ok(next) => next?,
            Err(_) => break,
        };
        match next {
            Next::Compacted { .. } => continue,
            Next::Event(e) if e.r#type == pb::EventType::Bookmark as i32 => break,
            Next::Event(e) => {
                let last = e.revision >= head;
                events.push(*e);
                if last {
                    break;
                }
            }
        }
    }
    Ok(events)
}

/// The events of `request` from its `from_revision` up to `head`, in order (no bookmarks).
pub async fn replay(
    client: &Client,
    request: pb::WatchRequest,
    head: i64,
) -> anyhow::Result<Vec<pb::Event>> {
    let mut follow = Follow::new(client.clone(), request);
    let mut events = catch_up(&mut follow, head).await?;
    events.retain(|e| e.revision <= head);
    Ok(events)
}

/// The first revision of a look back over [`HISTORY_WINDOW`] revisions before `head`.
pub fn window_start(head: i64) -> i64 {
    (head - HISTORY_WINDOW + 1).max(1)
}

/// Whether an event is a notice.
pub fn is_notice(e: &pb::Event) -> bool {
    e.r#type == pb::EventType::Notice as i32
}

/// The columns of event tables.
pub fn event_header(wide: bool) -> Vec<&'static str> {
    let mut h = vec!["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"];
    if wide {
        h.extend(["REVISION", "SOURCE"]);
    }
    h
}

/// One row of an event table; `None` for bookmarks.
pub fn event_row(e: &pb::Event, wide: bool, now: SystemTime) -> Option<Vec<(String, Tone)>> {
    use pb::event::Object;
    if e.r#type == pb::EventType::Bookmark as i32 {
        return None;
    }
    let object = view::object_of(e);
    let (kind, tone, reason, message, source) = match (&e.notice, &e.object) {
        (Some(n), _) => {
            let warning = view::is_warning(n);
            (
                if warning { "Warning" } else { "Normal" },
                if warning { Tone::Bad } else { Tone::Plain },
                n.reason.clone(),
                n.message.clone(),
                n.source.clone(),
            )
        }
        (None, Some(Object::Instance(i))) => {
            let state = view::state_of(i);
            let message = match &i.status {
                Some(s) if !s.message.is_empty() => s.message.clone(),
                Some(s) if !s.reason.is_empty() => s.reason.clone(),
                _ if i.node.is_empty() => "not placed".to_string(),
                _ => format!("on {}", i.node),
            };
            (
                view::event_type(e.r#type),
                Tone::Plain,
                state.to_string(),
                message,
                String::new(),
            )
        }
        (None, Some(Object::Workload(w))) => {
            let counts = w
                .status
                .as_ref()
                .and_then(|s| s.instances)
                .unwrap_or_default();
            (
                view::event_type(e.r#type),
                Tone::Plain,
                format!("generation {}", w.generation),
                format!("{} of {} ready", counts.ready, counts.desired),
                String::new(),
            )
        }
        (None, Some(Object::Node(n))) => (
            view::event_type(e.r#type),
            Tone::Plain,
            if view::node_ready(n) {
                "Ready"
            } else {
                "NotReady"
            }
            .to_string(),
            format!("{} instances", n.instance_count),
            String::new(),
        ),
        (None, None) => (
            view::event_type(e.r#type),
            Tone::Plain,
            String::new(),
            String::new(),
            String::new(),
        ),
    };
    let mut row = vec![
        (output::age(e.time.as_ref(), now), Tone::Plain),
        (kind.to_string(), tone),
        (reason, Tone::Plain),
        (format!("{}/{}", object.kind, object.name), Tone::Plain),
        (message, Tone::Plain),
    ];
    if wide {
        row.push((e.revision.to_string(), Tone::Plain));
        row.push((source, Tone::Plain));
    }
    Some(row)
}

/// Prints events: a table, a JSON/YAML list, or (watching) one JSON line / YAML document each.
pub struct EventPrinter {
    format: Format,
    color: bool,
    widths: Option<Vec<usize>>,
}

impl EventPrinter {
    /// A printer for `format`.
    pub fn new(format: Format, color: bool) -> Self {
        EventPrinter {
            format,
            color,
            widths: None,
        }
    }

    /// Prints the events known so far: a table with its header, or a list document.
    /// A watch (`watching`) prints the header even when there is nothing to list yet.
    pub fn print_list(
        &mut self,
        events: &[pb::Event],
        revision: i64,
        watching: bool,
    ) -> anyhow::Result<()> {
        if self.format.is_table() {
            let wide = self.format == Format::Wide;
            let mut table = Table::new(&event_header(wide), self.color);
            let now = SystemTime::now();
            for e in events {
                if let Some(row) = event_row(e, wide, now) {
                    table.toned_row(row);
                }
            }
            self.widths = Some(table.widths());
            if table.is_empty() && !watching {
                eprintln!("no events");
                return Ok(());
            }
            return print(&table.render());
        }
        let items = events
            .iter()
            .map(EventDoc::new)
            .collect::<anyhow::Result<_>>()?;
        let list = List {
            kind: "EventList",
            revision,
            items,
        };
        if let Some(text) = output::machine(self.format, &list)? {
            print(&text)?;
        }
        Ok(())
    }

    /// Prints one event that arrived while watching.
    pub fn print_one(&mut self, e: &pb::Event) -> anyhow::Result<()> {
        match self.format {
            Format::Table | Format::Wide => {
                let wide = self.format == Format::Wide;
                let header = event_header(wide);
                let Some(row) = event_row(e, wide, SystemTime::now()) else {
                    return Ok(());
                };
                let mut table = Table::new(&header, self.color);
                table.toned_row(row);
                let text = match &self.widths {
                    Some(widths) => table.render_rows(widths),
                    None => {
                        let text = table.render();
                        self.widths = Some(table.widths());
                        text
                    }
                };
                print(&text)
            }
            Format::Json => print(&output::json_line(&EventDoc::new(e)?)?),
            Format::Yaml => print(&format!("---\n{}", output::yaml(&EventDoc::new(e)?)?)),
        }
    }
}

/// `gantry events` and `gantry get events`.
pub async fn events(ctx: &mut Ctx, args: EventsArgs) -> anyhow::Result<()> {
    if args.since_revision.is_some_and(|r| r < 1) {
        return Err(UsageError("--since-revision must be at least 1".into()).into());
    }
    let client = ctx.client().await?;
    let head = head_revision(&client).await?;
    let filter = |from_revision| pb::WatchRequest {
        from_revision,
        kinds: Vec::new(),
        workload: args.workload.clone().unwrap_or_default(),
        node: args.node.clone().unwrap_or_default(),
        notices: true,
    };
    let wanted = |e: &pb::Event| args.all || is_notice(e);
    let mut printer = EventPrinter::new(args.output.output, ctx.color);
    let start = match (args.since_revision, args.watch) {
        (Some(r), _) => r,
        (None, false) => window_start(head),
        (None, true) => head + 1,
    };
    let mut follow = Follow::new(client, filter(start));
    let past: Vec<pb::Event> = catch_up(&mut follow, head)
        .await?
        .into_iter()
        .filter(|e| (args.watch || e.revision <= head) && wanted(e))
        .collect();
    if args.watch && !printer.format.is_table() {
        for e in &past {
            printer.print_one(e)?;
        }
    } else {
        printer.print_list(&past, head, args.watch)?;
    }
    if !args.watch {
        return Ok(());
    }
    loop {
        match follow.next().await? {
            Next::Event(e) if wanted(&e) => printer.print_one(&e)?,
            Next::Event(_) => {}
            Next::Compacted { oldest } => {
                eprintln!(
                    "warning: events before revision {oldest} were compacted and are skipped"
                );
            }
        }
    }
}
