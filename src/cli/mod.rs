//! The client half of the CLI: `get`, `describe`, `restart`, `pause`, `resume`,
//! `secret`, `logs`, `events` and `open` (the fleet page in the browser).
//! They talk to a running operator's admin API (see `registry`), finding it through
//! its state directory:
//!
//! - `STATE/address`: the operator's base URL, one line (e.g. `http://127.0.0.1:8080`),
//!   written by the operator once it listens (`registry::write_address`) and removed
//!   on clean shutdown. `--server URL` overrides it.
//! - `STATE/admin-token`: the admin bearer token (0600), created on first start.
//!
//! `main.rs` flattens [`ClientCommand`] into its subcommands and calls [`run`].

pub mod apply;
pub mod browser;
mod client;
pub mod output;
pub mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::Utc;
use serde::Serialize;

pub use client::{CliError, Client};

use crate::api::ObjectKey;

pub const DEFAULT_STATE_DIR: &str = "./.molecule";

/// Where to find the running operator.
#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// The operator's state directory: holds admin-token and, while it runs, address.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_STATE_DIR)]
    pub state: PathBuf,
    /// The operator's URL, e.g. http://127.0.0.1:8080 [default: read from STATE/address].
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people: aligned columns (`describe`: a report).
    #[default]
    Table,
    /// The table with more columns (`get workspaces`: CPU and MEMORY, the usage).
    Wide,
    /// Pretty JSON (`get`: an array of objects).
    Json,
    Yaml,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GetKind {
    #[value(alias = "workspace", alias = "ws")]
    Workspaces,
    #[value(alias = "team")]
    Teams,
    #[value(alias = "warmpool", alias = "wp")]
    Warmpools,
}

/// The one kind `describe`, `restart`, `pause` and `resume` act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkspaceKind {
    #[value(alias = "workspaces", alias = "ws")]
    Workspace,
}

#[derive(Clone, Debug, clap::Args)]
pub struct GetArgs {
    #[arg(value_enum)]
    pub kind: GetKind,
    /// Only this one (`NAME` or `NAMESPACE/NAME`).
    pub name: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Debug, clap::Args)]
pub struct DescribeArgs {
    #[arg(value_enum)]
    pub kind: WorkspaceKind,
    /// `NAME` (namespace `default`) or `NAMESPACE/NAME`.
    pub name: String,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Debug, clap::Args)]
pub struct VerbArgs {
    #[arg(value_enum)]
    pub kind: WorkspaceKind,
    /// `NAME` (namespace `default`) or `NAMESPACE/NAME`.
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Debug, clap::Args)]
pub struct WakeArgs {
    #[arg(value_enum)]
    pub kind: WorkspaceKind,
    /// `NAME` (namespace `default`) or `NAMESPACE/NAME`.
    pub name: String,
    /// Return once the agent is online again (its first heartbeat after the wake).
    #[arg(long)]
    pub wait: bool,
    /// With `--wait`: how long to wait at most, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Restart,
    Pause,
    Resume,
}

impl Verb {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Restart => "restart",
            Self::Pause => "pause",
            Self::Resume => "resume",
        }
    }
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// List workspaces, teams or warm pools: `get workspaces|teams|warmpools [-o table|wide|json|yaml]`.
    Get(GetArgs),
    /// Show one workspace: status, effective spec, conditions, token, decision log.
    Describe(DescribeArgs),
    /// Replace a workspace's container now (like `kubectl rollout restart`).
    Restart(VerbArgs),
    /// Freeze a workspace (overrides its declared operating mode until `resume`).
    Pause(VerbArgs),
    /// Run a paused or stopped workspace again.
    Resume(VerbArgs),
    /// Wake a workspace the lifecycle autopilot suspended (idle, or past its
    /// maxLifetime): `wake workspace NAME [--wait]`. On one that is not suspended it
    /// counts as activity: its idle time starts again. The admin API's
    /// `POST /api/v1/workspaces/{namespace}/{name}/wake` does the same.
    Wake(WakeArgs),
    /// Secrets delivered to workspaces as env vars, stored encrypted (AES-256-GCM).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// A workspace's agent output (stdout and stderr): `logs workspace NAME [-f]`.
    Logs(LogsArgs),
    /// The fleet's decisions, oldest first: when, which workspace, the rule, its cause,
    /// what was done and how it went. `-w` keeps printing them as they are made.
    Events(EventsArgs),
    /// Open the fleet page (the org tree, live) in the browser, logged in with a
    /// one-time code that works within a minute; `--no-browser` prints its URL instead.
    Open(OpenArgs),
}

#[derive(Clone, Debug, clap::Args)]
pub struct OpenArgs {
    /// Print the login URL instead of opening a browser (it works once, within a minute).
    #[arg(long)]
    pub no_browser: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Debug, clap::Args)]
pub struct LogsArgs {
    #[arg(value_enum)]
    pub kind: WorkspaceKind,
    /// `NAME` (namespace `default`) or `NAMESPACE/NAME`.
    pub name: String,
    /// Keep printing what the agent writes (Ctrl-C stops).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// How many of the last lines to print first.
    #[arg(long, default_value_t = 100)]
    pub tail: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Debug, clap::Args)]
pub struct EventsArgs {
    /// Keep watching: print each new decision as the operator makes it (Ctrl-C stops).
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// How many past decisions to print first.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// `text` (one line each) or `json` (one JSON object per line).
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Which workspaces a secret reaches: all (default), one team's, or one workspace's.
/// A workspace's value overrides its team's, which overrides the global one.
#[derive(Clone, Debug, clap::Args)]
pub struct SecretScope {
    /// Only this team's members (`NAME` or `NAMESPACE/NAME`).
    #[arg(long, conflicts_with = "workspace")]
    pub team: Option<String>,
    /// Only this workspace (`NAME` or `NAMESPACE/NAME`).
    #[arg(long)]
    pub workspace: Option<String>,
}

impl SecretScope {
    fn scope(&self) -> String {
        match (&self.team, &self.workspace) {
            (Some(t), _) => format!("team:{t}"),
            (_, Some(w)) => format!("workspace:{w}"),
            _ => "global".into(),
        }
    }
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum SecretCommand {
    /// Set a secret, its value read from standard input (`secret set NAME < file`, or
    /// piped) or from --from-file FILE. The workspaces that receive it are recreated per
    /// their update policy.
    Set {
        /// The env var name the workspaces see, e.g. OPENAI_API_KEY.
        name: String,
        /// Read the value from FILE (one trailing newline is dropped).
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Avoid: the value on the command line is visible to every local user in the
        /// process list, and stays in shell history. Prints a warning; use standard input
        /// or --from-file.
        #[arg(long, conflicts_with = "from_file", value_name = "VALUE")]
        value: Option<String>,
        #[command(flatten)]
        scope: SecretScope,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List secrets: scope, name, version, key id. Never values.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a secret.
    Delete {
        name: String,
        #[command(flatten)]
        scope: SecretScope,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Runs a client command: prints its output, or the error as a sentence on stderr.
pub async fn run(cmd: ClientCommand) -> ExitCode {
    let result = match &cmd {
        ClientCommand::Events(a) if a.watch => watch_events(a).await.map(|()| String::new()),
        ClientCommand::Logs(a) => logs(a).await.map(|()| String::new()),
        _ => execute(&cmd).await,
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a client command and returns what it would print.
pub async fn execute(cmd: &ClientCommand) -> Result<String, CliError> {
    match cmd {
        ClientCommand::Get(a) => get(a).await,
        ClientCommand::Describe(a) => describe(a).await,
        ClientCommand::Restart(a) => act(Verb::Restart, a).await,
        ClientCommand::Pause(a) => act(Verb::Pause, a).await,
        ClientCommand::Resume(a) => act(Verb::Resume, a).await,
        ClientCommand::Wake(a) => {
            let wait = a.wait.then(|| std::time::Duration::from_secs_f64(a.timeout.clamp(0.1, 600.0)));
            let answer = Client::new(&a.client)?.wake(&ObjectKey::parse(&a.name), wait).await?;
            Ok(format!(
                "{}
",
                answer.message
            ))
        }
        ClientCommand::Secret(c) => secret(c).await,
        ClientCommand::Logs(a) => logs(a).await.map(|()| String::new()),
        ClientCommand::Events(a) => {
            let events = Client::new(&a.client)?.events(a.limit).await?;
            Ok(events.iter().map(|e| event_line(e, &a.output) + "\n").collect())
        }
        ClientCommand::Open(a) => open(a).await,
    }
}

/// `open [--no-browser]`: a one-time login, then the browser on it (or its URL).
pub async fn open(a: &OpenArgs) -> Result<String, CliError> {
    let client = Client::new(&a.client)?;
    let (url, expires) = client.login().await?;
    let valid = format!("it works once, within {expires} s");
    if a.no_browser {
        eprintln!("the fleet page's login link ({valid}):");
        return Ok(format!("{url}\n"));
    }
    let launchers = browser::launchers(std::env::var("BROWSER").ok().as_deref());
    let target = url.to_string();
    let opened = tokio::task::spawn_blocking(move || browser::open(&target, &launchers))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match opened {
        Ok(with) => Ok(format!("opened the fleet page in the browser ({with}); the login link {valid}\n")),
        Err(why) => Ok(format!(
            "no browser could be opened ({why}; set $BROWSER to choose one). Open this URL, {valid}:\n{url}\n"
        )),
    }
}

/// `logs`: prints the agent's output as it arrives.
async fn logs(a: &LogsArgs) -> Result<(), CliError> {
    use std::io::Write as _;
    Client::new(&a.client)?
        .logs(&ObjectKey::parse(&a.name), a.follow, a.tail, |chunk| {
            let mut out = std::io::stdout().lock();
            out.write_all(chunk).and_then(|()| out.flush()).is_ok()
        })
        .await
}

/// `events -w`: prints as the decisions come.
async fn watch_events(a: &EventsArgs) -> Result<(), CliError> {
    use std::io::Write as _;
    Client::new(&a.client)?
        .watch_events(a.limit, |e| {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", event_line(&e, &a.output)).and_then(|()| out.flush()).is_ok()
        })
        .await
}

/// One decision as `events` prints it.
pub fn event_line(e: &crate::registry::events::FleetEvent, format: &str) -> String {
    if format == "json" {
        return serde_json::to_string(e).unwrap_or_default();
    }
    let d = &e.decision;
    let mut line = format!("{}  {}  {}  {}", d.at.format("%Y-%m-%dT%H:%M:%SZ"), e.workspace, d.rule, d.cause);
    if !d.actions.is_empty() {
        line += &format!(" → {}", d.actions.join(", "));
    }
    if d.outcome != "ok" {
        line += &format!("  [{}]", d.outcome);
    }
    line
}

/// `get workspaces|teams|warmpools [NAME] [-o table|wide|json|yaml]`.
pub async fn get(args: &GetArgs) -> Result<String, CliError> {
    let client = Client::new(&args.client)?;
    let key = args.name.as_deref().map(ObjectKey::parse);
    match args.kind {
        GetKind::Workspaces => {
            let mut all = client.workspaces().await?;
            if let Some(k) = &key {
                all.retain(|w| w.name == k.name && w.namespace == k.namespace);
                if all.is_empty() {
                    return Err(CliError::NotFound(format!("no workspace {k}")));
                }
            }
            match args.output {
                OutputFormat::Table => Ok(output::workspaces_table(&all, Utc::now())),
                OutputFormat::Wide => Ok(output::workspaces_table_wide(&all, Utc::now())),
                f => encode(&all, f),
            }
        }
        GetKind::Teams => {
            let mut all = client.teams().await?;
            if let Some(k) = &key {
                all.retain(|t| t.name == k.name && t.namespace == k.namespace);
                if all.is_empty() {
                    return Err(CliError::NotFound(format!("no team {k}")));
                }
            }
            match args.output {
                OutputFormat::Table | OutputFormat::Wide => Ok(output::teams_table(&all)),
                f => encode(&all, f),
            }
        }
        GetKind::Warmpools => {
            let mut all = client.pools().await?;
            if let Some(k) = &key {
                all.retain(|p| p.name == k.name && p.namespace == k.namespace);
                if all.is_empty() {
                    return Err(CliError::NotFound(format!("no warm pool {k}")));
                }
            }
            match args.output {
                OutputFormat::Table | OutputFormat::Wide => Ok(output::pools_table(&all)),
                f => encode(&all, f),
            }
        }
    }
}

/// `describe workspace NAME`.
pub async fn describe(args: &DescribeArgs) -> Result<String, CliError> {
    let client = Client::new(&args.client)?;
    let detail = client.workspace(&ObjectKey::parse(&args.name)).await?;
    match args.output {
        OutputFormat::Table | OutputFormat::Wide => Ok(output::describe(&detail, Utc::now())),
        f => encode(&detail, f),
    }
}

/// `restart|pause|resume workspace NAME`: prints the operator's one-line answer.
pub async fn act(action: Verb, args: &VerbArgs) -> Result<String, CliError> {
    let client = Client::new(&args.client)?;
    let answer = client.act(action.as_str(), &ObjectKey::parse(&args.name)).await?;
    Ok(format!("{}\n", answer.message))
}

fn encode<T: Serialize>(value: &T, format: OutputFormat) -> Result<String, CliError> {
    match format {
        OutputFormat::Json => {
            serde_json::to_string_pretty(value).map(|s| s + "\n").map_err(|e| CliError::Output(e.to_string()))
        }
        OutputFormat::Yaml | OutputFormat::Table | OutputFormat::Wide => {
            serde_saphyr::to_string(value).map_err(|e| CliError::Output(e.to_string()))
        }
    }
}

/// What `secret set --value` prints on standard error.
pub const VALUE_WARNING: &str = "warning: --value puts the secret in the process list (any local user can read it \
     while this runs) and in your shell history; pipe it on standard input or use --from-file FILE instead";

/// Runs a `secret` subcommand.
pub async fn secret(cmd: &SecretCommand) -> Result<String, CliError> {
    match cmd {
        SecretCommand::Set { name, value, from_file, scope, client } => {
            let value = match (value, from_file) {
                (Some(v), _) => {
                    eprintln!("{VALUE_WARNING}");
                    v.clone()
                }
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| CliError::Input(format!("cannot read {}: {e}", f.display())))?
                    .trim_end_matches('\n')
                    .to_string(),
                (None, None) => {
                    let mut v = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut v)
                        .map_err(|e| CliError::Input(format!("cannot read the value from standard input: {e}")))?;
                    v.trim_end_matches('\n').to_string()
                }
            };
            Ok(format!("{}\n", Client::new(client)?.set_secret(&scope.scope(), name, &value).await?))
        }
        SecretCommand::List { client } => {
            let rows = Client::new(client)?.secrets().await?;
            let now = Utc::now();
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.scope.clone(),
                        r.name.clone(),
                        r.version.to_string(),
                        r.key_id.clone(),
                        output::ago(Some(r.updated_at), now),
                    ]
                })
                .collect();
            Ok(output::table(&["SCOPE", "NAME", "VERSION", "KEY", "UPDATED"], &table))
        }
        SecretCommand::Delete { name, scope, client } => {
            Ok(format!("{}\n", Client::new(client)?.delete_secret(&scope.scope(), name).await?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    #[test]
    fn contract_command_lines_parse() {
        let c =
            Cli::try_parse_from(["m", "get", "workspaces", "-o", "json", "--server", "http://x:1", "--state", "/s"])
                .unwrap();
        let ClientCommand::Get(g) = c.cmd else { panic!() };
        assert_eq!((g.kind, g.output), (GetKind::Workspaces, OutputFormat::Json));
        assert_eq!(g.client.server.as_deref(), Some("http://x:1"));
        assert_eq!(g.client.state, PathBuf::from("/s"));

        let c = Cli::try_parse_from(["m", "get", "teams"]).unwrap();
        let ClientCommand::Get(g) = c.cmd else { panic!() };
        assert_eq!((g.kind, g.output), (GetKind::Teams, OutputFormat::Table));
        assert_eq!(g.client.state, PathBuf::from(DEFAULT_STATE_DIR));

        let c = Cli::try_parse_from(["m", "describe", "workspace", "dev-lead"]).unwrap();
        assert!(matches!(c.cmd, ClientCommand::Describe(d) if d.name == "dev-lead"));
        for verb in ["restart", "pause", "resume"] {
            let c = Cli::try_parse_from(["m", verb, "workspace", "eng/dev"]).unwrap();
            assert!(matches!(c.cmd, ClientCommand::Restart(_) | ClientCommand::Pause(_) | ClientCommand::Resume(_)));
        }
        assert!(Cli::try_parse_from(["m", "get", "gadgets"]).is_err());
    }

    #[test]
    fn yaml_and_json_encode_the_same_objects() {
        let v = vec![serde_json::json!({"name": "a", "uid": null})];
        assert!(encode(&v, OutputFormat::Json).unwrap().starts_with("[\n"));
        let y = encode(&v, OutputFormat::Yaml).unwrap();
        assert!(y.contains("name: a"), "{y}");
    }
}
