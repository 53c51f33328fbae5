use super::*;

fn config(toml_text: &str) -> PostgresSinkConfig {
    toml::from_str(toml_text).unwrap()
}

fn problems(c: &PostgresSinkConfig) -> Vec<String> {
    let mut p = Problems::new();
    c.check(&mut p);
    p.into_vec().iter().map(|p| p.to_string()).collect()
}

#[test]
fn a_password_in_the_url_is_refused_and_every_problem_is_named_at_its_key() {
    let c = config(
        r#"
url = "postgres://fleet:hunter2@db.example:5432/fleet"
table = "1st"
pool_size = 0
timeout = "10ms"
"#,
    );
    let shown = problems(&c);
    let expected = [
        "url: holds a password: give it as `password = { env = \"NAME\" }`",
        "table: `1st` must be 1-63 characters",
        "pool_size: must be between 1 and 16",
        "timeout: must be between 1s and 300s",
    ];
    assert_eq!(shown.len(), expected.len(), "{shown:#?}");
    for (got, want) in shown.iter().zip(expected) {
        assert!(got.starts_with(want), "{got}\n  expected {want}");
    }
    assert!(
        !shown.iter().any(|s| s.contains("hunter2")),
        "the password is not repeated: {shown:#?}"
    );
}

#[test]
fn the_password_comes_from_the_environment_or_a_file_and_a_missing_one_is_named() {
    let c = config(
        r#"
url = "host=127.0.0.1 port=5433 user=fleet dbname=fleet sslmode=require"
password = { env = "FLEETBUS_TEST_NEVER_SET_5150" }
"#,
    );
    assert_eq!(
        problems(&c),
        ["password: environment variable FLEETBUS_TEST_NEVER_SET_5150 is not set"]
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pg-password");
    std::fs::write(&file, "s3cret\n").unwrap();
    let c = config(&format!(
        "url = \"postgres://fleet@127.0.0.1/fleet\"\npassword = {{ file = \"{}\" }}\n",
        file.display()
    ));
    assert!(problems(&c).is_empty(), "{:#?}", problems(&c));
    let connection = c.connection().unwrap();
    assert_eq!(connection.get_password(), Some(&b"s3cret"[..]), "trimmed");
    assert_eq!(
        c.file_destination(&Message::decode("fleet/a/telemetry/x", b"{}").unwrap()),
        Some("postgres 127.0.0.1:5432/fleet table messages".into())
    );
}

#[test]
fn constraint_and_data_errors_refuse_the_row_and_the_rest_is_retried() {
    for code in [
        SqlState::CHECK_VIOLATION,
        SqlState::NOT_NULL_VIOLATION,
        SqlState::UNIQUE_VIOLATION,
        SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
        SqlState::UNTRANSLATABLE_CHARACTER,
        SqlState::PROGRAM_LIMIT_EXCEEDED,
    ] {
        assert!(refuses_the_row(&code), "{code:?}");
    }
    for code in [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::ADMIN_SHUTDOWN,
        SqlState::DISK_FULL,
        SqlState::UNDEFINED_TABLE,
        SqlState::INSUFFICIENT_PRIVILEGE,
        SqlState::CONNECTION_FAILURE,
    ] {
        assert!(!refuses_the_row(&code), "{code:?}");
    }
}

#[test]
fn a_table_template_is_taken_and_a_bad_one_named() {
    let c = config("url = \"postgres://db.example/fleet\"\ntable = \"m_{agent}_%Y\"\n");
    assert!(problems(&c).is_empty(), "{:#?}", problems(&c));
    let c = config("url = \"postgres://db.example/fleet\"\ntable = \"m-{agent}\"\n");
    let shown = problems(&c);
    assert_eq!(shown.len(), 1, "{shown:#?}");
    assert!(
        shown[0].starts_with("table: `m-{agent}`: `-` cannot be"),
        "{shown:#?}"
    );
}
