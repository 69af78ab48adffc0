//! `drover-bench`: the benchmark program (being written).

fn main() {
    eprintln!("drover-bench: not written yet");
    std::process::exit(2);
}
