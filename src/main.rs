//! The `aimc` binary: runs the command line and turns an error into one line on stderr and exit
//! status 1. A closed stdout or stderr (`aimc presets | head -1`) ends the program quietly with
//! status 0, as for any Unix filter whose reader has seen enough.
fn main() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        // `print!` panics when the reader of a pipe has gone; that is not a failure of aimc.
        if msg.starts_with("failed printing to std")
            && (msg.contains("Broken pipe") || msg.contains("os error 32"))
        {
            std::process::exit(0);
        }
        default_hook(info);
    }));
    if let Err(e) = aimc::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
