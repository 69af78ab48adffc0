//! `drover keyset show|rotate`.

use std::path::PathBuf;

use drover_protocol::keys::{PublicKey, SigningKey};

use super::{Ctx, Output, print_json};
use crate::trust::{Rotation, parse_key};

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

pub fn run(ctx: &Ctx, cmd: KeysetCommand) -> anyhow::Result<i32> {
    match cmd {
        KeysetCommand::Show => {
            let (_, ks) = crate::trust::load(&ctx.data)?;
            print_json(&ks)?;
            Ok(0)
        }
        KeysetCommand::Rotate(a) => rotate(ctx, a),
    }
}

fn rotate(ctx: &Ctx, a: RotateArgs) -> anyhow::Result<i32> {
    let (_, current) = crate::trust::load(&ctx.data)?;
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
    let next = crate::trust::rotate(&current, &change, &signers)?;
    // A running server stores it and sends it to every agent; otherwise store it here
    // and the server sends it when agents next connect.
    let resp: serde_json::Value = match ctx.client() {
        Ok(client) => client.post("rotate key set", "/api/v1/keyset", &next)?,
        Err(_) => {
            crate::trust::store(&ctx.data, &next)?;
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
