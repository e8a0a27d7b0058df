//! molecule-operator: clap wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use molecule::cli::ClientCommand;
use molecule::config::OperatorArgs;
use molecule::operator::SourceSpec;

/// Keeps AI-agent workspaces (Docker containers) and their auth tokens matching
/// what you declare, and heals every way the two come apart.
#[derive(Parser)]
#[command(name = "molecule-operator", version, propagate_version = true)]
#[command(after_help = "Start here: `molecule-operator up examples/org`, then `molecule-operator get workspaces`.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Local mode: watch DIR's Workspace/Team YAML, reconcile against the local Docker
    /// daemon, keep state in STATE/state.db, serve the registry and admin API. Ctrl-C stops.
    Up {
        /// Directory of Workspace and Team YAML files (searched recursively); a
        /// directory holding an org.yaml is read as an org template in the original
        /// platform's format (see docs/org-templates.md).
        #[arg(default_value = ".")]
        dir: PathBuf,
        #[command(flatten)]
        args: OperatorArgs,
    },
    /// The general form of `up`: name the sources explicitly.
    Run {
        /// `dir:PATH` (repeatable; the first source listed wins a name conflict; PATH
        /// may be, or hold, an org template with an org.yaml).
        #[arg(long = "source", required = true, value_name = "SOURCE")]
        sources: Vec<SourceSpec>,
        #[command(flatten)]
        args: OperatorArgs,
    },
    #[command(flatten)]
    Client(ClientCommand),
    /// Validate Workspace/Team manifests and write them into a Postgres desired-state
    /// database (read by `run --source postgres`).
    Apply(molecule::cli::apply::ApplyArgs),
    /// Print the Workspace and Team manifests equivalent to an org template in the
    /// original platform's format (a directory holding org.yaml), e.g. for
    /// `kubectl apply`. Secrets from .env files are named, never printed; nodes that
    /// cannot be converted are listed on standard error (exit status 1).
    Convert {
        /// The template's directory (the one holding org.yaml).
        dir: PathBuf,
    },
    /// Print the Workspace and Team CustomResourceDefinitions (crds/ holds this output).
    Crds,
    /// Build the molecule-agent:local image (a static agent in a FROM scratch image).
    AgentImage,
    /// Build the operator's own image, molecule-operator:<version> (deploy/ runs it):
    /// a static operator binary in a FROM scratch image.
    ///
    /// The binary: --binary PATH; else this executable, when it is static (a release
    /// built with the recipe below packages itself); else, when run from the source
    /// tree (./Cargo.toml), cargo builds it first with
    /// `RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_RELEASE_STRIP=debuginfo
    /// cargo build --release --target x86_64-unknown-linux-gnu --bin molecule-operator`. A dynamically linked binary is
    /// refused. deploy/README.md shows how to load the image into kind or k3s, or push it.
    Image {
        /// A static molecule-operator binary to package.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// The image's tag [default: molecule-operator:<version>].
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
    },
    /// Apply the state-store migrations to a database and exit.
    Migrate {
        /// postgres://..., postgresql://..., sqlite://PATH or a file path. Prefer the
        /// environment variable: a command line is visible in the process list.
        #[arg(long, env = "MOLECULE_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

fn init_tracing() {
    init_logs(molecule::config::LogFormat::Text, None, None);
}

/// Logs to stderr, or to `file` (while `up` draws its progress view on the terminal);
/// with `traces`, the reconcile spans are exported too. One global filter: per-layer
/// filters dropped log lines after sqlx's `enabled!` checks (see telemetry.rs).
fn init_logs(
    format: molecule::config::LogFormat,
    file: Option<&std::path::Path>,
    traces: Option<&molecule::telemetry::Traces>,
) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, Registry, layer::Layered};
    type Filtered = Layered<EnvFilter, Registry>;
    type Boxed = Box<dyn tracing_subscriber::Layer<Filtered> + Send + Sync>;
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if traces.is_some() {
        filter = filter.add_directive(
            format!("{}=trace", molecule::telemetry::TARGET).parse().expect("the trace target is a valid directive"),
        );
    }
    let opened = file.and_then(|path| {
        let _ = std::fs::create_dir_all(path.parent()?);
        std::fs::OpenOptions::new().create(true).append(true).open(path).ok()
    });
    let json = format == molecule::config::LogFormat::Json;
    let logs: Boxed = match (opened, json) {
        (Some(f), false) => {
            tracing_subscriber::fmt::layer().with_writer(std::sync::Mutex::new(f)).with_ansi(false).boxed()
        }
        (Some(f), true) => tracing_subscriber::fmt::layer().json().with_writer(std::sync::Mutex::new(f)).boxed(),
        (None, false) => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        (None, true) => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let mut layers: Vec<Boxed> = vec![logs];
    layers.extend(traces.map(|t| t.layer().boxed()));
    tracing_subscriber::registry().with(filter).with(layers).init();
}

fn main() -> ExitCode {
    // Before the runtime starts its threads.
    molecule::memory::tune_allocator();
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Client(cmd) => molecule::cli::run(cmd).await,
        Command::Crds => {
            print!("{}", molecule::api::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Up { dir, mut args } => {
            args.progress.get_or_insert(molecule::config::ProgressMode::Auto);
            report(run_operator(args, vec![SourceSpec::Dir(dir)]).await)
        }
        Command::Run { sources, args } => report(run_operator(args, sources).await),
        Command::Apply(a) => match molecule::cli::apply::apply(&a).await {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Convert { dir } => convert(&dir),
        Command::AgentImage => {
            init_tracing();
            report(agent_image().await)
        }
        Command::Image { binary, tag } => {
            init_tracing();
            report(operator_image(binary.as_deref(), tag).await)
        }
        Command::Migrate { database_url } => {
            init_tracing();
            report(migrate(&database_url).await)
        }
    }
}

fn convert(dir: &std::path::Path) -> ExitCode {
    if !molecule::source::org::is_org_dir(dir) {
        eprintln!("error: {} holds no org.yaml; give the directory of an org template", dir.display());
        return ExitCode::FAILURE;
    }
    let (manifests, errors) = molecule::source::org::manifests(&molecule::source::org::load(dir));
    print!("{manifests}");
    for e in &errors {
        eprintln!("error: {e}");
    }
    if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

async fn run_operator(args: OperatorArgs, sources: Vec<SourceSpec>) -> anyhow::Result<()> {
    let traces = match args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => Some(molecule::telemetry::Traces::start(endpoint, &args.instance_id())?),
        None => None,
    };
    init_logs(args.log_format, args.log_file().as_deref(), traces.as_ref());
    if let (Some(endpoint), Some(_)) = (&args.otlp_endpoint, &traces) {
        tracing::info!(url = %molecule::telemetry::traces_url(endpoint), "exporting traces over OTLP");
    }
    let result = molecule::operator::run(args, sources).await;
    if let Some(traces) = traces {
        traces.shutdown().await;
    }
    result
}

/// Applies the migrations to the store `url` names and says which (password hidden).
async fn migrate(url: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let database = molecule::store::DatabaseUrl::parse(url).map_err(|e| anyhow::anyhow!("--database-url: {e}"))?;
    molecule::store::open_url(&database)
        .await
        .with_context(|| format!("cannot migrate the state store at {database}"))?;
    println!("migrations applied to {database}");
    Ok(())
}

async fn agent_image() -> anyhow::Result<()> {
    let docker = molecule::runtime::docker::DockerRuntime::connect("agent-image").await?;
    docker.build_agent_image().await?;
    println!("built {}", molecule::runtime::agent_image::AGENT_IMAGE);
    Ok(())
}

async fn operator_image(binary: Option<&std::path::Path>, tag: Option<String>) -> anyhow::Result<()> {
    use molecule::runtime::operator_image;
    let binary = operator_image::find_binary(binary, std::path::Path::new(".")).map_err(anyhow::Error::msg)?;
    let bytes = operator_image::read_static(&binary).map_err(anyhow::Error::msg)?;
    let tag = tag.unwrap_or_else(operator_image::default_tag);
    let docker = molecule::runtime::docker::connect_client().await?;
    operator_image::build(&docker, &tag, &bytes).await?;
    println!("built {tag} from {}", binary.display());
    Ok(())
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
