//! `blkrepl`: the admin CLI (and, with `up --foreground`, the daemon itself).
//!
//! Exit codes: 0 success, 1 failure, 2 usage error, 3 resource not running, 10 configuration
//! error, 11 refused by the resource's state, 12 device in use, 13 permission denied.

use blkrepl::config::{ConfigError, NodeConfig, ResourceConfig};
use blkrepl::control::watch::{self, Source, WatchError};
use blkrepl::control::{self, client, Request};
use blkrepl::daemon;
use blkrepl::disk::{Disk, FileDisk};
use blkrepl::engine::{Engine, ResourceStatus};
use blkrepl::manpage;
use blkrepl::meta::{MetaParams, MetaStore};
use blkrepl::promoter;
use clap::{CommandFactory, Parser, Subcommand};
use status_view::{format_status, Detail};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

mod status_view;

/// `blkrepl --version`: the release and the two formats an upgrade may change. Nodes connect
/// only when their peer protocol versions are equal, so an operator compares these before
/// upgrading one node at a time (OPERATIONS.md, "Upgrading").
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (peer protocol {}, metadata format {})",
        env!("CARGO_PKG_VERSION"),
        blkrepl::wire::PROTOCOL_VERSION,
        blkrepl::meta::superblock::FORMAT_VERSION
    )
});

#[derive(Parser)]
#[command(
    name = "blkrepl",
    version,
    long_version = LONG_VERSION.as_str(),
    about = "Replicated block device: admin commands and daemon"
)]
struct Cli {
    /// Directory of resource files (`<resource>.toml`).
    #[arg(long, global = true, env = "BLKREPL_CONFIG_DIR", default_value = "/etc/blkrepl")]
    config_dir: PathBuf,
    /// This node's name in the resource files (default: the host name).
    #[arg(long, global = true, env = "BLKREPL_NODE")]
    node: Option<String>,
    /// Where daemons keep their control sockets, locks and logs.
    #[arg(long, global = true, env = "BLKREPL_RUN_DIR", default_value = "/run/blkrepl")]
    run_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write fresh metadata (superblock, bitmaps, activity log) to this node's disk.
    CreateMd {
        /// Overwrite existing metadata (its generation and bitmaps are lost).
        #[arg(long)]
        force: bool,
        resource: String,
    },
    /// Start the resource's daemon; returns once it listens.
    Up {
        /// Stay in the foreground (systemd), logging to stderr.
        #[arg(long)]
        foreground: bool,
        resource: String,
    },
    /// Stop the daemon cleanly (refused while the device is in use).
    Down { resource: String },
    /// Make this node Primary and export the device.
    Primary {
        /// Declare this node's data the good copy even if it is not UpToDate.
        #[arg(long)]
        force: bool,
        resource: String,
    },
    /// Make this node Secondary (refused while the device is in use).
    Secondary { resource: String },
    /// Connect to the peers again after `disconnect` (or a refused connection).
    Connect {
        /// This node is the victim of a split brain: overwrite its changes since the split
        /// with the peer's (a bitmap resync of both sides' changes).
        #[arg(long)]
        discard_my_data: bool,
        resource: String,
    },
    /// Re-read the resource file and apply quorum, on_no_quorum and after_sb_* changes.
    Adjust { resource: String },
    /// Drop the peer connections and stay StandAlone.
    Disconnect { resource: String },
    /// Show roles, disk and connection states, resync progress.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Every field: node ids, generation, quorum detail, each peer's last error.
        #[arg(long, short)]
        verbose: bool,
        /// Byte counters, out-of-sync amounts and resync rates.
        #[arg(long, short)]
        statistics: bool,
        /// One resource (default: every resource file in the config directory).
        resource: Option<String>,
    },
    /// Follow state changes as lines `exists|create|change|destroy OBJECT key:value ...`, as
    /// `drbdsetup events2` does (docs/OPERATIONS.md, "Events").
    Events {
        /// Print the current state, up to the `exists -` marker, and exit.
        #[arg(long)]
        now: bool,
        /// One JSON object per line (always with its time).
        #[arg(long)]
        json: bool,
        /// Prefix each line with its time (ISO-8601, UTC).
        #[arg(long)]
        timestamps: bool,
        /// Add byte counters and the resync rate to peer-device lines.
        #[arg(long)]
        statistics: bool,
        /// One resource (default: every resource file in the config directory).
        resource: Option<String>,
    },
    /// Start a new data generation; with --clear-bitmap on two fresh nodes, skip the initial sync.
    NewCurrentUuid {
        #[arg(long)]
        clear_bitmap: bool,
        resource: String,
    },
    /// Online verify: compare every block with each connected peer; blocks that differ are
    /// marked out of sync and reported in `status` (nothing is repaired).
    Verify { resource: String },
    /// Discard this node's data and resync all of it from a connected UpToDate peer.
    Invalidate { resource: String },
    /// End the I/O freeze of fencing: writes held for the fence-peer handler, or failing since
    /// it failed, go on under the usual rules (quorum still holds them if it is lost).
    ResumeIo { resource: String },
    /// Print the shell completion script for SHELL (the package installs bash's, zsh's and fish's).
    Completions { shell: clap_complete::Shell },
    /// Print this manual page (roff): `blkrepl man | man -l -`.
    Man,
    /// Stay in the foreground (systemd): promote this node when it may and nobody is primary,
    /// run the `[promoter]` section's services on the primary, stop them and demote when
    /// quorum goes or on SIGTERM (docs/OPERATIONS.md, "Running with the promoter").
    Promoter {
        /// Resources to look after (default: every one with a `[promoter]` section).
        resources: Vec<String>,
    },
}

/// A failure with the exit code it maps to.
struct Failure {
    message: String,
    code: u8,
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Failure {
        Failure { message: e.to_string(), code: 10 }
    }
}

fn fail(message: impl Into<String>, code: u8) -> Failure {
    Failure { message: message.into(), code }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("blkrepl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn node_name(cli: &Cli) -> Result<String, Failure> {
    match &cli.node {
        Some(node) => Ok(node.clone()),
        None => nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .map_err(|e| fail(format!("cannot read the host name ({e}): pass --node"), 10)),
    }
}

fn load(cli: &Cli, resource: &str) -> Result<(ResourceConfig, NodeConfig), Failure> {
    let config = ResourceConfig::load(&cli.config_dir, resource)?;
    let me = config.node(&node_name(cli)?)?.clone();
    Ok((config, me))
}

fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Cmd::CreateMd { force, resource } => create_md(&cli, resource, *force),
        Cmd::Up { foreground, resource } => up(&cli, resource, *foreground),
        Cmd::Down { resource } => down(&cli, resource),
        Cmd::Primary { force, resource } => request(&cli, resource, Request::Primary { force: *force }).map(|_| ()),
        Cmd::Secondary { resource } => request(&cli, resource, Request::Secondary).map(|_| ()),
        Cmd::Connect { discard_my_data, resource } => {
            request(&cli, resource, Request::Connect { discard_my_data: *discard_my_data }).map(|_| ())
        }
        Cmd::Adjust { resource } => request(&cli, resource, Request::Adjust).map(|_| ()),
        Cmd::Disconnect { resource } => request(&cli, resource, Request::Disconnect).map(|_| ()),
        Cmd::NewCurrentUuid { clear_bitmap, resource } => {
            request(&cli, resource, Request::NewCurrentUuid { clear_bitmap: *clear_bitmap }).map(|_| ())
        }
        Cmd::Status { json, verbose, statistics, resource } => {
            status(&cli, resource.as_deref(), *json, Detail { verbose: *verbose, statistics: *statistics })
        }
        Cmd::Events { now, json, timestamps, statistics, resource } => {
            events(&cli, resource.as_deref(), watch::Options { statistics: *statistics, now: *now, require_running: *now && resource.is_some() }, *json, *timestamps)
        }
        Cmd::Verify { resource } => {
            let status = request(&cli, resource, Request::Verify)?;
            let peers: Vec<&str> = status
                .iter()
                .flat_map(|s| &s.peers)
                .filter(|p| p.verify.as_ref().is_some_and(|v| v.state == "running"))
                .map(|p| p.name.as_str())
                .collect();
            println!("{resource}: online verify started with {}; `blkrepl status {resource}` shows progress and findings", peers.join(", "));
            Ok(())
        }
        Cmd::Promoter { resources } => promoter(&cli, resources),
        Cmd::Invalidate { resource } => {
            request(&cli, resource, Request::Invalidate)?;
            println!("{resource}: invalidated; all of this node's data is resynced from its UpToDate peer (`blkrepl status {resource}` shows progress)");
            Ok(())
        }
        Cmd::ResumeIo { resource } => {
            request(&cli, resource, Request::ResumeIo)?;
            println!("{resource}: I/O resumed; the fence-peer handler's answer, if it still comes, is ignored");
            Ok(())
        }
        Cmd::Completions { shell } => {
            // Into a buffer first: clap_complete panics when it cannot write.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "blkrepl", &mut script);
            print_bytes(&script, "completion script")
        }
        Cmd::Man => {
            let mut page = Vec::new();
            manpage::render(Cli::command(), &mut page).map_err(|e| fail(format!("cannot render the manual page: {e}"), 1))?;
            print_bytes(&page, "manual page")
        }
    }
}

fn print_bytes(bytes: &[u8], what: &str) -> Result<(), Failure> {
    std::io::stdout().write_all(bytes).map_err(|e| fail(format!("cannot write the {what}: {e}"), 1))
}

fn request(cli: &Cli, resource: &str, request: Request) -> Result<Option<ResourceStatus>, Failure> {
    let (config, me) = load(cli, resource)?;
    let socket = control::socket_path(&cli.run_dir, &config.name, &me.name);
    match client::call(&socket, &request) {
        Ok(response) => match response.error {
            None => Ok(response.status),
            Some(error) => Err(fail(format!("{resource}: {error}"), response.exit_code.clamp(1, 255) as u8)),
        },
        Err(client::ClientError::NotRunning) => Err(not_up(resource, &me.name)),
        Err(e) => Err(fail(e.to_string(), 1)),
    }
}

fn not_up(resource: &str, node: &str) -> Failure {
    fail(format!("{resource} is not up on node {node} (start it with `blkrepl up {resource}`)"), 3)
}

/// Follows the resource (or every resource) until interrupted; with --now, prints its state
/// and returns.
fn events(cli: &Cli, resource: Option<&str>, options: watch::Options, json: bool, timestamps: bool) -> Result<(), Failure> {
    let names: Vec<String> = match resource {
        Some(name) => vec![name.to_owned()],
        None => resource_names(&cli.config_dir)?,
    };
    let mut sources = Vec::new();
    for name in &names {
        let (config, me) = load(cli, name)?;
        sources.push(Source { socket: control::socket_path(&cli.run_dir, &config.name, &me.name), resource: config.name });
    }
    let stdout = std::io::stdout();
    let result = watch::watch(sources, options, |event| {
        let line = if json { serde_json::to_string(event).expect("events serialize") } else { event.text(timestamps) };
        let mut out = stdout.lock();
        writeln!(out, "{line}")?;
        out.flush()
    });
    match result {
        Ok(()) => Ok(()),
        Err(WatchError::NotRunning { resource }) => Err(not_up(&resource, &node_name(cli)?)),
        // The consumer went away: nothing left to do.
        Err(WatchError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e @ WatchError::Stream { source: client::ClientError::Refused { exit_code, .. }, .. }) => {
            Err(fail(e.to_string(), exit_code.clamp(1, 255) as u8))
        }
        Err(e) => Err(fail(e.to_string(), 1)),
    }
}

/// Stops the daemon and returns once its process is gone: its disk and run locks are free, so
/// an `up` right after it cannot find the disk "in use" (the daemon answers before it exits).
fn down(cli: &Cli, resource: &str) -> Result<(), Failure> {
    let (config, me) = load(cli, resource)?;
    let lock = control::lock_path(&cli.run_dir, &config.name, &me.name);
    let pid = std::fs::read_to_string(&lock).ok().and_then(|text| text.trim().parse::<u32>().ok());
    request(cli, resource, Request::Down)?;
    let Some(pid) = pid else { return Ok(()) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !control::process_gone(pid) {
        if std::time::Instant::now() >= deadline {
            return Err(fail(format!("{resource}: the daemon (pid {pid}) stopped but has not exited after 30 s"), 1));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}

fn create_md(cli: &Cli, resource: &str, force: bool) -> Result<(), Failure> {
    let (config, me) = load(cli, resource)?;
    let open = |path: &Path| {
        if !path.exists() {
            return Err(fail(
                format!("disk {} does not exist: create it (e.g. `truncate -s 1G {}`) or fix `disk` in {}", path.display(), path.display(), config.path.display()),
                1,
            ));
        }
        FileDisk::open(path).map_err(|e| fail(e.to_string(), 1))
    };
    let Some(disk) = &me.disk else {
        if me.meta_disk.is_none() {
            println!("{resource}: node {} is a diskless witness (disk = \"none\") without meta_disk: it keeps what it learns in memory, nothing to create", me.name);
            return Ok(());
        }
        let path = Engine::create_witness_metadata(&config, &me, force).map_err(|e| fail(e.to_string(), 1))?;
        println!("{resource}: witness metadata created in {} for node {} (id {})", path.display(), me.name, me.id);
        return Ok(());
    };
    let data = open(disk)?;
    let data_len = data.len().map_err(|e| fail(format!("{}: {e}", disk.display()), 1))?;
    let (meta_disk, internal): (std::sync::Arc<dyn Disk>, bool) = match &me.meta_disk {
        Some(path) => (std::sync::Arc::new(open(path)?), false),
        None => (std::sync::Arc::new(data), true),
    };
    let params = MetaParams {
        max_peers: (config.nodes.len() - 1) as u8,
        bitmap_block_size: config.bitmap_block_size,
        al_extents: config.al_extents,
    };
    let peers: Vec<u8> = config.peers_of(&me).map(|p| p.id).collect();
    let store = MetaStore::create(meta_disk, data_len, internal, params, &config.name, me.id, &peers, force)
        .map_err(|e| fail(format!("{}: {e}", disk.display()), 1))?;
    println!(
        "{resource}: metadata created on {} for node {} (id {}): device size {} bytes, bitmaps for {} peer(s)",
        disk.display(),
        me.name,
        me.id,
        store.layout().data_size,
        peers.len()
    );
    Ok(())
}

fn up(cli: &Cli, resource: &str, foreground: bool) -> Result<(), Failure> {
    let (config, me) = load(cli, resource)?;
    config.check_authenticates()?;
    if foreground {
        daemon::block_termination_signals();
        init_logging();
        let ready = daemon::Readiness::from_env();
        return daemon::run(config, me, &cli.run_dir, ready).map_err(|e| fail(e.to_string(), 1));
    }
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    std::fs::create_dir_all(&cli.run_dir).map_err(|e| fail(format!("cannot create {}: {e}", cli.run_dir.display()), 1))?;
    let log = control::log_path(&cli.run_dir, &config.name, &me.name);
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| fail(format!("cannot open log {}: {e}", log.display()), 1))?;
    let exe = std::env::current_exe().map_err(|e| fail(format!("cannot find own executable: {e}"), 1))?;
    let mut child = Command::new(exe);
    child
        .arg("--config-dir")
        .arg(&cli.config_dir)
        .arg("--node")
        .arg(&me.name)
        .arg("--run-dir")
        .arg(&cli.run_dir)
        .args(["up", "--foreground", resource])
        .env("BLKREPL_READY_PIPE", "1")
        // This daemon reports to `up` through the pipe. A NOTIFY_SOCKET inherited from a service
        // that runs `blkrepl up` (Pacemaker's, say) is that service's: READY=1 and MAINPID= from
        // here would speak for it.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .process_group(0);
    let mut child = child.spawn().map_err(|e| fail(format!("cannot start the daemon: {e}"), 1))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) if line == "READY" => {
            println!("{resource}: up on node {} (pid {}, log {})", me.name, child.id(), log.display());
            Ok(())
        }
        Some(Ok(line)) => {
            let _ = child.wait();
            Err(fail(line.trim_start_matches("ERROR: ").to_owned(), 1))
        }
        _ => {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(fail(format!("the daemon exited during start-up ({status}); see {}", log.display()), 1))
        }
    }
}

/// Looks after the named resources (or every one with a `[promoter]` section where this node
/// holds data) until SIGTERM or SIGINT.
fn promoter(cli: &Cli, resources: &[String]) -> Result<(), Failure> {
    let named = !resources.is_empty();
    let names = if named { resources.to_vec() } else { resource_names(&cli.config_dir)? };
    let mut targets = Vec::new();
    for name in &names {
        let (config, me) = load(cli, name)?;
        match promoter::Target::new(&config, &me, &cli.run_dir) {
            Ok(target) => targets.push(target),
            Err(unfit) if named => return Err(fail(unfit.to_string(), 10)),
            Err(_) => {}
        }
    }
    if targets.is_empty() {
        return Err(fail(format!("no resource in {} has a [promoter] section for data node {}", cli.config_dir.display(), node_name(cli)?), 10));
    }
    init_logging();
    promoter::driver::run(targets).map_err(|e| fail(e.to_string(), 1))
}

/// Logs to stderr (the journal under systemd, a log file under `up`), `BLKREPL_LOG` filtering;
/// colours only on a terminal.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLKREPL_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init();
}

fn status(cli: &Cli, resource: Option<&str>, json: bool, detail: Detail) -> Result<(), Failure> {
    let names: Vec<String> = match resource {
        Some(name) => vec![name.to_owned()],
        None => resource_names(&cli.config_dir)?,
    };
    let mut statuses = Vec::new();
    let mut down = Vec::new();
    for name in &names {
        match request(cli, name, Request::Status) {
            Ok(Some(status)) => statuses.push(status),
            Ok(None) => {}
            Err(f) if f.code == 3 && resource.is_none() => down.push(name.clone()),
            Err(f) => return Err(f),
        }
    }
    if json {
        println!("{}", serde_json::json!({ "resources": statuses }));
    } else {
        for status in &statuses {
            print!("{}", format_status(status, detail));
        }
        for name in down {
            println!("{name}: not running");
        }
    }
    Ok(())
}

fn resource_names(dir: &Path) -> Result<Vec<String>, Failure> {
    let entries = std::fs::read_dir(dir).map_err(|e| fail(format!("cannot read {}: {e}", dir.display()), 10))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".toml")).map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}
