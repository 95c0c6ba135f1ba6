//! Configuration layering: defaults < anycable-ds.toml < ANYCABLE_* env < flags.

mod common;

use std::process::Output;

use common::{temp_dir, Server};

fn run(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Server::command(dir);
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run anycable-ds")
}

fn effective(output: &Output) -> toml::Table {
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap().parse().expect("--print-config prints TOML")
}

fn limit(config: &toml::Table) -> i64 {
    config["broker"]["history_limit"].as_integer().unwrap()
}

#[test]
fn file_then_env_then_flag() {
    let dir = temp_dir();
    std::fs::write(dir.path().join("anycable-ds.toml"), "[broker]\nhistory_limit = 5\n\n[ds]\nsse_ttl = 9\n").unwrap();

    let defaults_only = run(temp_dir().path(), &["--print-config"], &[]);
    assert_eq!(limit(&effective(&defaults_only)), 100);

    let file = effective(&run(dir.path(), &["--print-config"], &[]));
    assert_eq!(limit(&file), 5);
    assert_eq!(file["ds"]["sse_ttl"].as_integer(), Some(9));

    let env = effective(&run(dir.path(), &["--print-config"], &[("ANYCABLE_HISTORY_LIMIT", "6")]));
    assert_eq!(limit(&env), 6);
    assert_eq!(env["ds"]["sse_ttl"].as_integer(), Some(9), "env overrides only its own key");

    let flag =
        effective(&run(dir.path(), &["--print-config", "--history_limit", "7"], &[("ANYCABLE_HISTORY_LIMIT", "6")]));
    assert_eq!(limit(&flag), 7);

    // --config PATH instead of the current directory's file; PORT below ANYCABLE_PORT.
    let other = temp_dir();
    let path = other.path().join("custom.toml");
    std::fs::write(&path, "public_streams_unused = false\n").unwrap();
    std::fs::write(&path, "[server]\nport = 9001\n").unwrap();
    let custom = effective(&run(temp_dir().path(), &["--print-config", "--config", path.to_str().unwrap()], &[]));
    assert_eq!(custom["server"]["port"].as_integer(), Some(9001));
    let port = effective(&run(temp_dir().path(), &["--print-config"], &[("PORT", "9100")]));
    assert_eq!(port["server"]["port"].as_integer(), Some(9100));
    let both = effective(&run(temp_dir().path(), &["--print-config"], &[("PORT", "9100"), ("ANYCABLE_PORT", "9200")]));
    assert_eq!(both["server"]["port"].as_integer(), Some(9200));
}

#[test]
fn boolean_flags_take_an_optional_value() {
    let dir = temp_dir();
    let bare = effective(&run(dir.path(), &["--print-config", "--public_streams"], &[]));
    assert_eq!(bare["streams"]["public"].as_bool(), Some(true));
    let explicit = effective(&run(dir.path(), &["--print-config", "--ds_skip_auth=true"], &[]));
    assert_eq!(explicit["ds"]["skip_auth"].as_bool(), Some(true));
    let env = effective(&run(dir.path(), &["--print-config"], &[("ANYCABLE_PUBLIC_STREAMS", "true")]));
    assert_eq!(env["streams"]["public"].as_bool(), Some(true));
}

#[test]
fn print_config_round_trips() {
    let dir = temp_dir();
    let first = run(
        dir.path(),
        &["--print-config", "--secret", "s3", "--history_ttl", "60", "--allowed_origins", "*.example.com"],
        &[],
    );
    let text = String::from_utf8(first.stdout.clone()).unwrap();
    effective(&first);
    std::fs::write(dir.path().join("anycable-ds.toml"), &text).unwrap();
    let second = run(dir.path(), &["--print-config"], &[]);
    assert_eq!(String::from_utf8(second.stdout).unwrap(), text);
}

#[test]
fn unknown_keys_and_bad_values_stop_start_up_naming_the_key() {
    let cases = [
        ("[broker]\nhistory_limt = 5\n", "history_limt"),
        ("colour = \"blue\"\n", "colour"),
        ("[broker]\nhistory_limit = \"lots\"\n", "history_limit"),
        ("[ds]\npoll_interval = 0\n", "ds.poll_interval"),
        ("[server]\nport = 70000\n", "port"),
        ("[jwt]\nforce = true\n", "jwt.force"),
    ];
    for (file, key) in cases {
        let dir = temp_dir();
        std::fs::write(dir.path().join("anycable-ds.toml"), file).unwrap();
        let output = run(dir.path(), &["--print-config"], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.contains(key), "{file}: error should name {key}: {stderr}");
    }
    let dir = temp_dir();
    let bad_env = run(dir.path(), &["--print-config"], &[("ANYCABLE_HISTORY_LIMIT", "many")]);
    assert!(!bad_env.status.success());
    assert!(String::from_utf8_lossy(&bad_env.stderr).contains("history_limit"));
    let missing = run(dir.path(), &["--print-config", "--config", "/nonexistent/x.toml"], &[]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/x.toml"));
}

#[test]
fn help_lists_flags_with_env_names_and_defaults() {
    let output = run(temp_dir().path(), &["--help"], &[]);
    let help = String::from_utf8(output.stdout).unwrap();
    for needle in ["--history_limit", "ANYCABLE_HISTORY_LIMIT", "[default: 100]", "--public_streams", "--ds_sse_ttl"] {
        assert!(help.contains(needle), "--help should mention {needle}");
    }
}

#[test]
fn the_repository_example_config_is_valid() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let output = run(std::path::Path::new(repo), &["--print-config"], &[]);
    let config = effective(&output);
    assert_eq!(config["storage"]["data_dir"].as_str(), Some("./data"));
}

#[test]
fn the_repository_example_config_documents_every_key() {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/anycable-ds.toml")).unwrap();
    // Every key of the effective config, with every optional secret set so it is printed too.
    let output = run(
        temp_dir().path(),
        &["--print-config", "--secret", "a", "--broadcast_key", "b", "--streams_secret", "c", "--jwt_secret", "d"],
        &[],
    );
    let config = effective(&output);
    let mut missing = Vec::new();
    for (key, value) in &config {
        match value.as_table() {
            Some(table) => {
                for sub in table.keys() {
                    if !documented(&example, key, sub) {
                        missing.push(format!("{key}.{sub}"));
                    }
                }
            }
            None if !documented(&example, "", key) => missing.push(key.clone()),
            None => {}
        }
    }
    assert!(missing.is_empty(), "anycable-ds.toml does not document {missing:?}");
}

/// Whether `key` appears (set or commented out) in `[section]` of the example file.
fn documented(example: &str, section: &str, key: &str) -> bool {
    let mut current = String::new();
    for line in example.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
            continue;
        }
        let line = line.trim_start_matches('#').trim();
        if current == section && line.starts_with(&format!("{key} =")) {
            return true;
        }
    }
    false
}

/// Runs the server (not `--print-config`) with `args` and expects it to refuse to start: exit
/// code 2 within a few seconds, and stderr naming `key`. A server that starts instead is killed
/// and the test fails.
fn refuses_to_start(args: &[&str], env: &[(&str, &str)], file: Option<&str>, key: &str, also: &str) {
    let dir = temp_dir();
    if let Some(file) = file {
        std::fs::write(dir.path().join("anycable-ds.toml"), file).unwrap();
    }
    let mut command = Server::command(dir.path());
    command.args(["--port", "0", "--data_dir"]).arg(dir.path().join("data")).args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("run anycable-ds");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} {env:?} {file:?}: the server started instead of refusing {key}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let what = format!("{args:?} {env:?} {file:?}");
    assert_eq!(output.status.code(), Some(2), "{what}: {stderr}");
    assert!(stderr.contains(key), "{what}: the error should name {key}: {stderr}");
    assert!(stderr.contains(also), "{what}: the error should say {also:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{what}: one line, no panic: {stderr}");
}

const U64_MAX: &str = "18446744073709551615";

#[test]
fn durations_and_sizes_beyond_their_range_stop_start_up() {
    // (flag, key, range as the error states it, values past either end)
    let cases: &[(&str, &str, &str, &[&str])] = &[
        ("--ds_poll_interval", "ds.poll_interval", "between 1 and 3600 seconds", &[U64_MAX, "3601", "0"]),
        ("--ds_sse_ttl", "ds.sse_ttl", "between 1 and 86400 seconds", &[U64_MAX, "86401", "0"]),
        ("--history_ttl", "broker.history_ttl", "between 0 and 315360000 seconds", &[U64_MAX, "315360001"]),
        ("--ds_max_chunk_bytes", "ds.max_chunk_bytes", "between 1 and 1073741824 bytes", &[U64_MAX, "1073741825", "0"]),
        (
            "--http_broadcast_max_body",
            "http_broadcast.max_body",
            "between 1 and 1073741824 bytes",
            &[U64_MAX, "1073741825", "0"],
        ),
        ("--workers", "server.workers", "between 0 and 1024", &[U64_MAX, "1025"]),
        (
            "--storage_cache_capacity",
            "storage.cache_capacity",
            "between 1048576 and 1099511627776 bytes",
            &[U64_MAX, "0", "255", "1048575"],
        ),
        ("--storage_read_cache_bytes", "storage.read_cache_bytes", "between 0 and 1099511627776 bytes", &[U64_MAX]),
    ];
    for (flag, key, range, values) in cases {
        for value in *values {
            refuses_to_start(&[flag, value], &[], None, key, range);
        }
    }
    // The same bounds hold for the file and the environment.
    refuses_to_start(&[], &[], Some("[ds]\npoll_interval = 9223372036854775807\n"), "ds.poll_interval", "3600");
    refuses_to_start(&[], &[("ANYCABLE_DS_SSE_TTL", U64_MAX)], None, "ds.sse_ttl", "86400");
    refuses_to_start(&[], &[("ANYCABLE_HISTORY_TTL", U64_MAX)], None, "broker.history_ttl", "315360000");
}

#[test]
fn the_ends_of_each_range_are_accepted() {
    let dir = temp_dir();
    let args = [
        "--print-config",
        "--ds_poll_interval",
        "3600",
        "--ds_sse_ttl",
        "86400",
        "--history_ttl",
        "315360000",
        "--ds_max_chunk_bytes",
        "1073741824",
        "--http_broadcast_max_body",
        "1",
        "--workers",
        "1024",
        "--storage_cache_capacity",
        "1048576",
        "--storage_read_cache_bytes",
        "0",
    ];
    let config = effective(&run(dir.path(), &args, &[]));
    assert_eq!(config["ds"]["poll_interval"].as_integer(), Some(3600));
    assert_eq!(config["ds"]["sse_ttl"].as_integer(), Some(86400));
    assert_eq!(config["broker"]["history_ttl"].as_integer(), Some(315360000));
    assert_eq!(config["server"]["workers"].as_integer(), Some(1024));
    let low = effective(&run(dir.path(), &["--print-config", "--ds_poll_interval", "1", "--history_ttl", "0"], &[]));
    assert_eq!(low["ds"]["poll_interval"].as_integer(), Some(1));
}

/// The longest durations allowed must not overflow anything when a live read uses them (with
/// u64::MAX, `Instant + Duration` panicked on every long-poll and SSE read).
#[tokio::test]
async fn the_longest_durations_work_for_live_reads() {
    let dir = temp_dir();
    let server = Server::start(
        dir.path(),
        &["--ds_poll_interval", "3600", "--ds_sse_ttl", "86400", "--history_ttl", "315360000"],
    );
    server.publish("s", common::numbered(1..=1)).await;
    let tail = server.tail("s").await;
    let poll = tokio::spawn(server.client.get(server.ds(&format!("s?offset={tail}&live=long-poll"))).send());
    let mut sse = common::SseClient::open(&server, "s?offset=-1&live=sse").await;
    let (first, _) = sse.next_batch(std::time::Duration::from_secs(10)).await.expect("SSE batch");
    assert_eq!(first, common::numbered(1..=1));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    server.publish("s", common::numbered(2..=2)).await;
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), poll).await.unwrap().unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let (messages, _, _) = common::read_parts(response).await;
    assert_eq!(messages, common::numbered(2..=2));
    let (second, _) = sse.next_batch(std::time::Duration::from_secs(10)).await.expect("SSE batch");
    assert_eq!(second, common::numbered(2..=2));
    let (all, _, _) = server.read("s", "-1").await;
    assert_eq!(all.len(), 2, "a 10-year history_ttl keeps everything");
}

#[tokio::test]
async fn jwt_secret_none_turns_jwt_off_even_when_secret_is_set() {
    let dir = temp_dir();
    let off = Server::start(dir.path(), &["--secret", "s", "--jwt_secret", "none"]);
    assert_eq!(off.get("s?offset=-1").await.status(), 200, "no token needed");
    // JWT is off, so a token is not even looked at (with JWT on, a bad token is a 401).
    assert_eq!(off.get("s?offset=-1&jid=not-a-jwt").await.status(), 200, "token ignored");

    let dir = temp_dir();
    let derived = Server::start(dir.path(), &["--secret", "s"]);
    assert_eq!(derived.get("s?offset=-1").await.status(), 200, "JWT optional without --enforce_jwt");
    assert_eq!(derived.get("s?offset=-1&jid=not-a-jwt").await.status(), 401, "JWT from secret checks tokens");

    let dir = temp_dir();
    let enforced = Server::start(dir.path(), &["--secret", "s", "--enforce_jwt"]);
    assert_eq!(enforced.get("s?offset=-1").await.status(), 401);
    assert_eq!(enforced.get("s?offset=-1&jid=not-a-jwt").await.status(), 401);

    // Enforcing JWT with JWT turned off refuses every client: a start-up error.
    refuses_to_start(&["--secret", "s", "--jwt_secret", "none", "--enforce_jwt"], &[], None, "jwt.force", "none");
    refuses_to_start(
        &["--enforce_jwt"],
        &[("ANYCABLE_SECRET", "s"), ("ANYCABLE_JWT_SECRET", "none")],
        None,
        "jwt.force",
        "",
    );
    refuses_to_start(&["--enforce_jwt"], &[], Some("secret = \"s\"\n[jwt]\nsecret = \"none\"\n"), "jwt.force", "");
}

#[test]
fn jwt_secret_none_survives_print_config_from_every_source() {
    let printed = |args: &[&str], env: &[(&str, &str)], file: Option<&str>| {
        let dir = temp_dir();
        if let Some(file) = file {
            std::fs::write(dir.path().join("anycable-ds.toml"), file).unwrap();
        }
        let output = run(dir.path(), &[&["--print-config"], args].concat(), env);
        effective(&output);
        String::from_utf8(output.stdout).unwrap()
    };
    let flag = printed(&["--secret", "s", "--jwt_secret", "none"], &[], None);
    let config: toml::Table = flag.parse().unwrap();
    assert_eq!(config["jwt"]["secret"].as_str(), Some("none"), "{flag}");
    assert_eq!(printed(&["--secret", "s"], &[("ANYCABLE_JWT_SECRET", "none")], None), flag);
    assert_eq!(printed(&[], &[], Some("secret = \"s\"\n[jwt]\nsecret = \"none\"\n")), flag);
    // Round trip: the printed TOML, fed back, prints (and so means) the same.
    assert_eq!(printed(&[], &[], Some(&flag)), flag);
    // `none` still means "not set" for the other secrets: they are derived from `secret`.
    let others = printed(&["--secret", "s", "--streams_secret", "none", "--broadcast_key", "none"], &[], None);
    let config: toml::Table = others.parse().unwrap();
    assert!(config["streams"].get("secret").is_none(), "{others}");
    assert!(config.get("broadcast_key").is_none(), "{others}");
    assert!(config["jwt"].get("secret").is_none(), "{others}");
}
