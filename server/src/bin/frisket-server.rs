fn main() {
    let cli = frisket_server::cli::parse();
    if let Err(e) = frisket_server::cli::run(cli) {
        // One line: the error and its causes, outermost first.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
