//! `drover plugin sign|publish|list`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use drover_protocol::keys::SigningKey;
use drover_protocol::manifest::{Capabilities, Manifest, World, sha256_hex};
use drover_protocol::signed::Signed;

use super::types::{Plugin, PublishRequest};
use crate::cli::args::parse_duration;
use crate::cli::context::{Ctx, Output};
use crate::cli::print::{ago, print_json, print_table};

/// Plugin commands.
#[derive(Debug, clap::Subcommand)]
pub enum PluginCommand {
    /// Write a signed manifest for a component.
    Sign(SignArgs),
    /// Upload a component and its signed manifest to the server.
    Publish(PublishArgs),
    /// List published plugins.
    List,
}

/// Flags of `drover plugin sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The component (.wasm).
    wasm: PathBuf,
    /// The plugin's name.
    #[arg(long)]
    name: String,
    /// Its version: strictly greater than any published before.
    #[arg(long)]
    version: u64,
    /// The WIT world it implements: inventory-collector, command-runner or task.
    #[arg(long)]
    world: World,
    /// Ask for the host-facts capability.
    #[arg(long)]
    host_facts: bool,
    /// Ask for read-only access to a host directory; repeatable.
    #[arg(long = "read-path")]
    read_paths: Vec<String>,
    /// Ask to run a program (its exact absolute path) through the process import;
    /// repeatable.
    #[arg(long = "exec", value_name = "PATH")]
    exec: Vec<String>,
    /// Ask for TCP connections to HOST:PORT; repeatable. Without it, no sockets.
    #[arg(long = "network", value_name = "HOST:PORT")]
    network: Vec<String>,
    /// Ask to read the job parameter NAME; repeatable.
    #[arg(long = "parameter", value_name = "NAME")]
    parameters: Vec<String>,
    /// How long agents may install it.
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    expires: Duration,
    /// A publisher key to sign with; repeatable, for key sets that need several
    /// signatures. Defaults to the data directory's publisher key.
    #[arg(long)]
    key: Vec<PathBuf>,
    /// Where to write the manifest; defaults to <wasm>.manifest.json.
    #[arg(long, short)]
    out: Option<PathBuf>,
}

/// Flags of `drover plugin publish`.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The component (.wasm).
    wasm: PathBuf,
    /// The signed manifest; defaults to <wasm>.manifest.json.
    #[arg(long)]
    manifest: Option<PathBuf>,
}

fn default_manifest(wasm: &std::path::Path) -> PathBuf {
    let mut s = wasm.as_os_str().to_owned();
    s.push(".manifest.json");
    s.into()
}

/// `drover plugin`.
pub fn run(ctx: &Ctx, cmd: PluginCommand) -> anyhow::Result<i32> {
    match cmd {
        PluginCommand::Sign(a) => sign(ctx, a),
        PluginCommand::Publish(a) => publish(ctx, a),
        PluginCommand::List => list(ctx),
    }
}

fn sign(ctx: &Ctx, a: SignArgs) -> anyhow::Result<i32> {
    let bytes = std::fs::read(&a.wasm).with_context(|| format!("reading {}", a.wasm.display()))?;
    let key_paths = if a.key.is_empty() {
        vec![ctx.data.publisher_key()]
    } else {
        a.key
    };
    let keys = key_paths
        .iter()
        .map(|p| {
            SigningKey::load(p).with_context(|| {
                format!(
                    "loading the publisher key {} (run `drover keygen` first)",
                    p.display()
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let now = drover_protocol::now_secs();
    let manifest = Manifest {
        name: a.name,
        version: a.version,
        sha256: sha256_hex(&bytes),
        length: bytes.len() as u64,
        world: a.world,
        capabilities: Capabilities {
            host_facts: a.host_facts,
            read_paths: a.read_paths,
            exec: a.exec,
            network: a.network,
            parameters: a.parameters,
        },
        issued_at: now,
        expires_at: now + a.expires.as_secs(),
    };
    manifest.validate().map_err(anyhow::Error::msg)?;
    let mut signed = Signed::sign(&manifest, &keys[0]);
    for k in &keys[1..] {
        signed.add_signature(k);
    }
    let out = a.out.unwrap_or_else(|| default_manifest(&a.wasm));
    drover_protocol::durable::replace(&out, &serde_json::to_vec_pretty(&signed)?)
        .with_context(|| format!("writing {}", out.display()))?;
    match ctx.output {
        Output::Json => print_json(&serde_json::json!({ "manifest": out, "signed": manifest }))?,
        Output::Text => println!(
            "signed {} v{} ({} bytes, sha256 {}) -> {}",
            manifest.name,
            manifest.version,
            manifest.length,
            &manifest.sha256[..16],
            out.display()
        ),
    }
    Ok(0)
}

fn publish(ctx: &Ctx, a: PublishArgs) -> anyhow::Result<i32> {
    let bytes = std::fs::read(&a.wasm).with_context(|| format!("reading {}", a.wasm.display()))?;
    let mpath = a.manifest.unwrap_or_else(|| default_manifest(&a.wasm));
    let manifest: Signed<Manifest> = serde_json::from_slice(
        &std::fs::read(&mpath).with_context(|| format!("reading {}", mpath.display()))?,
    )
    .with_context(|| format!("{} is not a signed manifest", mpath.display()))?;
    let req = PublishRequest {
        manifest,
        blob_base64: base64::engine::general_purpose::STANDARD.encode(&bytes),
    };
    let resp: serde_json::Value = ctx.client()?.post("publish", "/api/v1/plugins", &req)?;
    match ctx.output {
        Output::Json => print_json(&resp)?,
        Output::Text => println!(
            "published {} v{}",
            resp["name"].as_str().unwrap_or("?"),
            resp["version"]
        ),
    }
    Ok(0)
}

fn list(ctx: &Ctx) -> anyhow::Result<i32> {
    let plugins: Vec<Plugin> = ctx.client()?.get("list plugins", "/api/v1/plugins")?;
    if ctx.output == Output::Json {
        print_json(&plugins)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = plugins
        .iter()
        .map(|p| {
            let caps = p
                .manifest
                .unverified()
                .map(|m| m.capabilities.describe().join(","))
                .unwrap_or_default();
            vec![
                p.name.clone(),
                p.version.to_string(),
                p.world.clone(),
                p.length.to_string(),
                p.sha256[..16].to_string(),
                caps,
                ago(p.published_ms),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "VERSION",
            "WORLD",
            "BYTES",
            "SHA256",
            "CAPABILITIES",
            "PUBLISHED",
        ],
        &rows,
    );
    Ok(0)
}
