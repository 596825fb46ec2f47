//! What the model benchmarks share: the daemon's thread-pool setting and their arguments.

use std::path::PathBuf;

/// Match the daemon (candle's compute threads park soon instead of spinning), and return the
/// benchmark's arguments (without cargo's `--bench`) and the model path: the first argument,
/// else `default`.
pub fn setup(default: &str) -> (Vec<String>, PathBuf) {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let path = PathBuf::from(args.first().map_or(default, String::as_str));
    (args, path)
}
