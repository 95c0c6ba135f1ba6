use clap::Parser;

use anycable_ds::config::{Cli, Config};

fn main() {
    let cli = Cli::parse();
    let config = match Config::load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("anycable-ds: {e}");
            std::process::exit(2);
        }
    };
    if cli.print_config {
        print!("{}", config.to_toml());
        return;
    }
    env_logger::Builder::new()
        .parse_filters(&config.logging.level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    if let Err(e) = actix_web::rt::System::new().block_on(anycable_ds::server::run(config)) {
        log::error!("{e}");
        eprintln!("anycable-ds: {e}");
        std::process::exit(1);
    }
}
