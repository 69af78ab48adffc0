//! `drover keygen` and `drover keyset show|rotate`.

use std::path::PathBuf;

use drover_protocol::keys::{PublicKey, SigningKey, load_public, public_path};

use super::files::{self, Rotation, parse_key};
use crate::cli::context::{Ctx, Output};
use crate::cli::print::print_json;

/// Key set commands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysetCommand {
    /// Show the key set agents trust.
    Show,
    /// Make the next key set, signed by the current roots, and send it to every agent.
    Rotate(RotateArgs),
}

/// Flags of `drover keyset rotate`. Keys are hex or `.pub` files.
#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// A publisher key to trust; repeatable.
    #[arg(long, value_parser = parse_key)]
    add_publisher: Vec<PublicKey>,
    /// A publisher key to stop trusting; repeatable.
    #[arg(long, value_parser = parse_key)]
    remove_publisher: Vec<PublicKey>,
    /// Distinct publisher signatures a manifest needs.
    #[arg(long)]
    publisher_threshold: Option<u32>,
    /// A root key to add; repeatable.
    #[arg(long, value_parser = parse_key)]
    add_root: Vec<PublicKey>,
    /// A root key to remove; repeatable.
    #[arg(long, value_parser = parse_key)]
    remove_root: Vec<PublicKey>,
    /// Distinct root signatures the next key set needs.
    #[arg(long)]
    root_threshold: Option<u32>,
    /// A control-plane key to trust; repeatable.
    #[arg(long, value_parser = parse_key)]
    add_control_plane: Vec<PublicKey>,
    /// A control-plane key to stop trusting; repeatable.
    #[arg(long, value_parser = parse_key)]
    remove_control_plane: Vec<PublicKey>,
    /// A current root's private key to sign with; repeatable. Defaults to the data
    /// directory's root key.
    #[arg(long)]
    sign_with: Vec<PathBuf>,
}

/// `drover keyset`.
pub fn run(ctx: &Ctx, cmd: KeysetCommand) -> anyhow::Result<i32> {
    match cmd {
        KeysetCommand::Show => {
            let (_, ks) = files::load(&ctx.data)?;
            print_json(&ks)?;
            Ok(0)
        }
        KeysetCommand::Rotate(a) => rotate(ctx, a),
    }
}

fn rotate(ctx: &Ctx, a: RotateArgs) -> anyhow::Result<i32> {
    let (_, current) = files::load(&ctx.data)?;
    let key_paths = if a.sign_with.is_empty() {
        vec![ctx.data.root_key()]
    } else {
        a.sign_with
    };
    let signers = key_paths
        .iter()
        .map(|p| SigningKey::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let change = Rotation {
        add_publishers: a.add_publisher,
        remove_publishers: a.remove_publisher,
        publisher_threshold: a.publisher_threshold,
        add_roots: a.add_root,
        remove_roots: a.remove_root,
        root_threshold: a.root_threshold,
        add_control_plane: a.add_control_plane,
        remove_control_plane: a.remove_control_plane,
    };
    let next = files::rotate(&current, &change, &signers)?;
    // A running server stores it and sends it to every agent; otherwise store it here
    // and the server sends it when agents next connect.
    let resp: serde_json::Value = match ctx.client() {
        Ok(client) => client.post("rotate key set", "/api/v1/keyset", &next)?,
        Err(_) => {
            files::store(&ctx.data, &next)?;
            serde_json::json!({ "version": current.version + 1, "sent_to": 0 })
        }
    };
    match ctx.output {
        Output::Json => print_json(&resp)?,
        Output::Text => println!(
            "key set version {} issued; sent to {} agent(s)",
            resp["version"], resp["sent_to"]
        ),
    }
    Ok(0)
}

/// Flags of `drover keygen`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {}

/// `drover keygen`.
pub fn keygen(ctx: &Ctx, _a: KeygenArgs) -> anyhow::Result<i32> {
    ctx.data.create()?;
    let mut out = serde_json::Map::new();
    for (name, path) in [
        ("root", ctx.data.root_key()),
        ("publisher", ctx.data.publisher_key()),
        ("control_plane", ctx.data.control_plane_key()),
    ] {
        let created = if path.exists() {
            false
        } else {
            SigningKey::generate().save(&path)?;
            true
        };
        let public = load_public(&public_path(&path))?;
        if ctx.output == Output::Text {
            println!(
                "{name:<14} {} {} ({})",
                public,
                if created { "created" } else { "exists " },
                path.display()
            );
        }
        out.insert(
            name.to_string(),
            serde_json::json!({ "public_key": public, "path": path, "created": created }),
        );
    }
    let created = files::ensure_initial(&ctx.data)?;
    let (_, ks) = files::load(&ctx.data)?;
    if ctx.output == Output::Text {
        println!(
            "{:<14} version {} {} ({})",
            "key set",
            ks.version,
            if created { "created" } else { "exists " },
            ctx.data.keyset().display()
        );
    }
    out.insert(
        "keyset".to_string(),
        serde_json::json!({ "version": ks.version, "path": ctx.data.keyset(), "created": created }),
    );
    if ctx.output == Output::Json {
        print_json(&out)?;
    }
    Ok(0)
}
