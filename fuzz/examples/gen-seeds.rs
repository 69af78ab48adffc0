//! Rewrites the checked-in seed corpus in `fuzz/seeds/TARGET/` from
//! `drover_protocol_fuzz::seeds()`: `cargo run --example gen-seeds` inside `fuzz/`.
//! Signatures are deterministic; sealed boxes are not (fresh ephemeral keys and nonces).

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (target, name, bytes) in drover_protocol_fuzz::seeds() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), &bytes)?;
        println!("seeds/{target}/{name}: {} bytes", bytes.len());
    }
    Ok(())
}
