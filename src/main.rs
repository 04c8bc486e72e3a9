fn main() {
    if let Err(e) = aimc::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
