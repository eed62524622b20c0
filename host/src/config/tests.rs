use super::*;
use crate::fanout::Fanout;

fn parse(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
    /// Any file is applied or refused with a message naming a key;
    /// nothing panics. (Applying does not compile: that is `build`.)
    #[test]
    fn any_file_is_applied_or_refused_by_key(
        limit in "(fuel|memory_mib|deadline_ms|max_instances|queue_wait_ms|header_timeout_ms|max_headers|max_header_kib|max_connections)",
        value in proptest::prelude::any::<u64>(),
        adapter in "(http|fixture|simulated|other)",
        url in "[a-z:/@.0-9]{0,30}",
        concurrency in proptest::prelude::any::<u32>(),
    ) {
        let text = format!(
            "[limits]\n{limit} = {value}\n[upstreams.u]\nadapter = \"{adapter}\"\nurl = \"{url}\"\nmax_concurrency = {concurrency}\n"
        );
        if let Ok(config) = parse(&text)
            && let Err(e) = config.apply(Fanout::builder())
        {
            proptest::prop_assert!(!e.to_string().is_empty());
        }
    }
}

fn apply_err(text: &str) -> String {
    let config = parse(text).expect("parses");
    match config.apply(Fanout::builder()) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let err = parse("listen = \"127.0.0.1:1\"\ncolour = 1\n").unwrap_err();
    assert!(err.contains("colour") && err.contains("line 2"), "{err}");
    let err = parse("[upstreams.a]\nadapter = \"carrier-pigeon\"\n").unwrap_err();
    assert!(err.contains("carrier-pigeon"), "{err}");
    let err = parse("[upstreams.a]\nadapter = \"http\"\nhttp2 = \"sometimes\"\n").unwrap_err();
    assert!(err.contains("sometimes"), "{err}");
    let err = parse("[upstreams.a]\nadapter = \"http\"\ncache = { ttl = 5 }\n").unwrap_err();
    assert!(err.contains("ttl"), "{err}");
    let err = parse("listen = \"not an address\"\n").unwrap_err();
    assert!(err.contains("listen"), "{err}");
}

#[test]
fn semantic_errors_name_the_key() {
    let cases = [
        ("[upstreams.p]\nadapter = \"http\"\n", "upstreams.p.url"),
        ("[upstreams.p]\nadapter = \"fixture\"\n", "upstreams.p.dir"),
        (
            "[upstreams.p]\nadapter = \"http\"\nurl = \"http://x\"\ndir = \"d\"\n",
            "upstreams.p.dir",
        ),
        (
            "[upstreams.p]\nadapter = \"simulated\"\nerror_rate = 2.0\n",
            "upstreams.p.error_rate",
        ),
        (
            "[upstreams.p]\nadapter = \"http\"\nurl = \"http://x\"\nconnect_timeout_ms = 0\n",
            "upstreams.p.connect_timeout_ms",
        ),
        (
            "[upstreams.p]\nadapter = \"simulated\"\nmax_concurrency = 0\n",
            "upstreams.p",
        ),
        (
            "[upstreams.p]\nadapter = \"http\"\nurl = \"http://x\"\nheaders = { authorization = \"Bearer ${env:FANOUT_TEST_UNSET_TOKEN}\" }\n",
            "upstreams.p.headers.authorization",
        ),
        (
            "[upstreams.p]\nadapter = \"http\"\nurl = \"http://x\"\ncache = { ttl_ms = 0 }\n",
            "upstreams.p.cache",
        ),
        (
            "[upstreams.p]\nadapter = \"http\"\nurl = \"http://x\"\ncache = { max_entry_kib = 2048, max_mib = 1 }\n",
            "upstreams.p.cache",
        ),
        (
            "[upstreams.p]\nadapter = \"http\"\nurl = \"https://x\"\nca_file = \"/nonexistent/ca.pem\"\n",
            "upstreams.p.ca_file",
        ),
        (
            "[upstreams.p]\nadapter = \"http\"\nurl = \"http://x\"\nca_file = \"ca.pem\"\n",
            "upstreams.p.url",
        ),
        (
            "[upstreams.p]\nadapter = \"http\"\nurl = \"https://x\"\ntls_server_name = \"not a name!\"\n",
            "upstreams.p.tls_server_name",
        ),
        (
            "[upstreams.p]\nadapter = \"simulated\"\nhttp2 = \"always\"\n",
            "upstreams.p.http2",
        ),
        ("[limits]\nmax_instances = 0\n", "limits.max_instances"),
        ("[limits]\nmemory_mib = 0\n", "limits.memory"),
    ];
    for (text, key) in cases {
        let err = apply_err(text);
        assert!(err.contains(key), "{text}: {err}");
    }
}

#[test]
fn the_shipped_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fanout.toml");
    let config = FileConfig::load(&path).expect("fanout.toml parses");
    let (builder, settings) = config.apply(Fanout::builder()).expect("applies");
    assert!(settings.listen.is_some());
    builder.build().expect("fanout.toml builds");
}

/// `fanout` without `--config` serves what `fanout.toml` describes.
#[test]
fn the_shipped_example_is_the_demo() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fanout.toml");
    let file = FileConfig::load(&path).expect("fanout.toml parses");
    let routes = |raw: fanout_guest::config::RawConfig| {
        serde_json::to_value(raw.routes.expect("routes")).unwrap()
    };
    let demo: fanout_guest::config::RawConfig =
        serde_json::from_value(crate::demo::guest_config()).unwrap();
    assert_eq!(routes(file.guest.expect("[guest]")), routes(demo));
    let mut names: Vec<&str> = file.upstreams.keys().map(String::as_str).collect();
    let mut demo: Vec<&str> = crate::demo::upstreams().iter().map(|u| u.0).collect();
    names.sort();
    demo.sort();
    assert_eq!(names, demo);
}

#[test]
fn the_log_table_sets_the_shed_lines() {
    let config = parse("[log]\nshed_lines_per_second = 0\n").expect("parses");
    assert_eq!(config.log.shed_lines_per_second, Some(0));
    assert!(config.apply(Fanout::builder()).is_ok());
    let err = parse("[log]\nshed_lines_per_second = -1\n").unwrap_err();
    assert!(err.contains("shed_lines_per_second"), "{err}");
    let err = parse("[log]\ncolour = true\n").unwrap_err();
    assert!(err.contains("colour") && err.contains("line 2"), "{err}");
}

#[test]
fn the_log_table_sets_the_format() {
    use crate::config::LogFormat;
    let format = |text: &str| parse(text).map(|file| file.log.format);
    assert_eq!(format("").unwrap(), None, "not set: by the terminal");
    assert_eq!(
        format("[log]\nformat = \"json\"\n").unwrap(),
        Some(LogFormat::Json)
    );
    assert_eq!(
        format("[log]\nformat = \"pretty\"\n").unwrap(),
        Some(LogFormat::Pretty)
    );
    let err = format("[log]\nformat = \"xml\"\n").unwrap_err();
    assert!(
        err.contains("xml")
            && err.contains("json")
            && err.contains("pretty")
            && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn the_log_table_sizes_the_queue_of_log_lines() {
    let lines = |text: &str| parse(text).expect("parses").log_buffer_lines();
    assert_eq!(lines("").unwrap(), None, "not set: the binary's default");
    assert_eq!(lines("[log]\nbuffer_lines = 64\n").unwrap(), Some(64));
    let err = lines("[log]\nbuffer_lines = 0\n").unwrap_err().to_string();
    assert!(
        err.contains("log.buffer_lines") && err.contains("at least 1"),
        "{err}"
    );
    let err = parse("[log]\nbuffer_lines = -1\n").unwrap_err();
    assert!(err.contains("buffer_lines"), "{err}");
}
