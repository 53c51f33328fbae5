//! `fleetbus events ...`: the event console of a running server, through its admin
//! endpoint: list the folded rows, acknowledge, close, silence.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use fleetbus_console::{EventRow, Silence, SilenceRow};

use super::admin_client::AdminEndpoint;

/// `fleetbus events ...`
#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    admin: AdminEndpoint,
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// The folded events, the latest first: id, severity, state, count, first and last
    /// time, agent, class, rule, text.
    List {
        /// Only rows not closed (open or acknowledged).
        #[arg(long)]
        open: bool,
        /// Only rows of at least this severity (1-5).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5))]
        min_severity: Option<u8>,
        /// Only this agent's rows.
        #[arg(long)]
        agent: Option<String>,
        /// Only rows of this group (the event's, or one of the agent's).
        #[arg(long)]
        group: Option<String>,
        /// Rows a silence covers too.
        #[arg(long)]
        silenced: bool,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge a row: someone is on it.
    Ack {
        /// The row's id.
        id: i64,
        /// What is being done.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Close a row.
    Close {
        /// The row's id.
        id: i64,
        /// Why.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Silence events of an agent, a rule or a group (or all they name together) for a
    /// while: they still fold into rows, marked silenced, and `list` leaves them out.
    Silence {
        /// Events of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Events of this rule or check.
        #[arg(long)]
        rule: Option<String>,
        /// Events of this group (the event's, or one of the agent's).
        #[arg(long)]
        group: Option<String>,
        /// How long (`30m`, `2h`, `1d`).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Why.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// The silences in effect.
    Silences,
}

fn print_rows(rows: &[EventRow]) {
    let table: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.severity.to_string(),
                format!("{:?}", r.state).to_lowercase(),
                r.count.to_string(),
                r.first.format("%Y-%m-%d %H:%M:%S").to_string(),
                r.last.format("%Y-%m-%d %H:%M:%S").to_string(),
                r.agent.clone(),
                format!("{} {}", r.class, r.rule.as_deref().unwrap_or("")),
                r.text.chars().take(80).collect(),
            ]
        })
        .collect();
    super::table::print_table(
        [
            "id",
            "sev",
            "state",
            "count",
            "first",
            "last",
            "agent",
            "class rule",
            "text",
        ],
        &table,
    );
}

fn print_silences(silences: &[SilenceRow]) {
    let table: Vec<[String; 6]> = silences
        .iter()
        .map(|s| {
            [
                s.id.to_string(),
                s.agent.clone().unwrap_or_else(|| "*".into()),
                s.rule.clone().unwrap_or_else(|| "*".into()),
                s.group.clone().unwrap_or_else(|| "*".into()),
                s.until.format("%Y-%m-%d %H:%M:%S").to_string(),
                format!("{} ({})", s.comment, s.created_by),
            ]
        })
        .collect();
    super::table::print_table(["id", "agent", "rule", "group", "until", "comment"], &table);
}

/// Acknowledges or closes row `id`; prints it after.
async fn change(
    client: &super::admin_client::AdminClient,
    action: &str,
    id: i64,
    comment: String,
) -> anyhow::Result<ExitCode> {
    let row: EventRow = client
        .post(
            &format!("/events/{id}/{action}"),
            &serde_json::json!({ "comment": comment }),
        )
        .await?;
    print_rows(std::slice::from_ref(&row));
    Ok(ExitCode::SUCCESS)
}

/// Runs `fleetbus events ...`.
pub async fn run(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let client = args.admin.client()?;
    match args.command {
        EventsCommand::List {
            open,
            min_severity,
            agent,
            group,
            silenced,
            limit,
            json,
        } => {
            let path = format!(
                "/events{}",
                super::admin_client::query(&[
                    ("limit", Some(limit.to_string())),
                    ("open", open.then(|| "true".to_string())),
                    ("silenced", silenced.then(|| "true".to_string())),
                    ("min_severity", min_severity.map(|s| s.to_string())),
                    ("agent", agent),
                    ("group", group),
                ])
            );
            let rows: Vec<EventRow> = client.get(&path).await?;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                print_rows(&rows);
                println!("{} row(s)", rows.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        EventsCommand::Ack { id, comment } => change(&client, "ack", id, comment).await,
        EventsCommand::Close { id, comment } => change(&client, "close", id, comment).await,
        EventsCommand::Silence {
            agent,
            rule,
            group,
            duration,
            comment,
        } => {
            let silence = Silence {
                agent,
                rule,
                group,
                duration,
                comment,
            };
            let made: SilenceRow = client.post("/silences", &silence).await?;
            print_silences(std::slice::from_ref(&made));
            Ok(ExitCode::SUCCESS)
        }
        EventsCommand::Silences => {
            let silences: Vec<SilenceRow> = client.get("/silences").await?;
            print_silences(&silences);
            Ok(ExitCode::SUCCESS)
        }
    }
}
