use super::*;

fn item(topic: &str, body: &str) -> Item {
    Item::new(1, Message::decode(topic, body.as_bytes()).unwrap())
}

fn lines(template: &str, item: &Item) -> Result<String, String> {
    let mut out = String::new();
    points(item, &Measurement::parse(template).unwrap(), &mut out).map(|_| out)
}

#[test]
fn each_metric_is_one_point_with_its_tags_fields_and_nanosecond_time() {
    let record = item(
        "fleet/web-01/telemetry/metrics",
        r#"{"seq":3,"ts":"2026-12-01T10:00:00.123456789Z","tags":{"role":"web server","n":1},
            "metrics":[
              {"name":"cpu.usage","value":3.5,"warn":80,"crit":90,"min":0,"max":100,"labels":{"cpu":"total"}},
              {"name":"disk.used","value":91,"labels":{"mount":"/var, /tmp","role":"db=x"}}]}"#,
    );
    assert_eq!(
        lines("{metric}", &record).unwrap(),
        "cpu.usage,agent=web-01,cpu=total,role=web\\ server,stream=metrics value=3.5,warn=80,crit=90,min=0,max=100 1796119200123456789\n\
         disk.used,agent=web-01,mount=/var\\,\\ /tmp,role=db\\=x,stream=metrics value=91 1796119200123456789\n"
    );
    // the agent's groups when the server accepted it: one tag, over a record's own
    let record = record.with_groups(vec!["linux".into(), "web".into()]);
    let with_groups = lines("{metric}", &record).unwrap();
    assert!(
        with_groups.starts_with("cpu.usage,agent=web-01,cpu=total,groups=linux\\,web,role=web\\ server,stream=metrics value=3.5"),
        "{with_groups}"
    );
    let claims = item(
        "fleet/web-01/telemetry/metrics",
        r#"{"seq":4,"tags":{"groups":"admin"},"metrics":[{"name":"load","value":1}]}"#,
    );
    let claims = claims.with_groups(vec!["web".into()]);
    assert!(lines("{metric}", &claims)
        .unwrap()
        .starts_with("load,agent=web-01,groups=web,stream=metrics value=1 "));
    assert_eq!(
        lines("fleet {stream}.{metric}", &record)
            .unwrap()
            .split(',')
            .next(),
        Some("fleet\\ metrics.cpu.usage")
    );
}

/// A check result's performance data: a `U` value is no point, and a threshold range is a
/// string field of its own (a field keeps one type).
#[test]
fn an_undetermined_value_is_skipped_and_a_range_is_a_string_field() {
    let record = item(
        "fleet/web-01/telemetry/checks",
        r#"{"seq":3,"ts":"2026-12-01T10:00:00Z","check":{"name":"disk","status":1},
            "metrics":[
              {"name":"free","value":null},
              {"name":"used","value":91,"unit":"%","warn":"~:80","crit":"@90:95","max":100}]}"#,
    );
    assert_eq!(
        lines("{metric}", &record).unwrap(),
        "used,agent=web-01,stream=checks value=91,warn_range=\"~:80\",crit_range=\"@90:95\",max=100 1796119200000000000\n"
    );
    let only_undetermined = item(
        "fleet/web-01/telemetry/checks",
        r#"{"seq":4,"metrics":[{"name":"free","value":null}]}"#,
    );
    assert_eq!(lines("{metric}", &only_undetermined).unwrap(), "");
}

#[test]
fn a_message_without_points_says_why() {
    let no_metrics = item(
        "fleet/web-01/telemetry/heartbeat",
        r#"{"seq":1,"ts":"2026-12-01T10:00:00Z"}"#,
    );
    assert!(lines("{metric}", &no_metrics)
        .unwrap_err()
        .contains("only metric records become points"));
    let no_value = item(
        "fleet/web-01/telemetry/metrics",
        r#"{"seq":1,"metrics":[{"name":"a","value":1},{"name":"b","value":"high"}]}"#,
    );
    let mut out = String::from("before\n");
    let e = points(
        &no_value,
        &Measurement::parse("{metric}").unwrap(),
        &mut out,
    )
    .unwrap_err();
    assert_eq!(e, "metric 1 (`b`) has no numeric `value`");
    assert_eq!(
        out, "before\n",
        "a refused message leaves no half of its points"
    );
}

#[test]
fn every_problem_is_reported_at_its_key() {
    let problems = |text: &str| {
        let config: InfluxSinkConfig = toml::from_str(text).unwrap();
        let mut p = Problems::new();
        config.check(&mut p);
        p.into_vec()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        problems("url = \"ftp://x\"\ndatabase = \"d\"\nbucket = \"b\"\nmeasurement = \"{metric}_{nope}\"\n"),
        [
            "url: `ftp://x` must start with http:// or https://",
            "database: set `database` (InfluxDB 1.x, `/write`) or `org` and `bucket` (2.x, `/api/v2/write`), not both",
            "org: is needed with `bucket`",
            "measurement: `{metric}_{nope}`: unknown placeholder `{nope}` (known: {metric}, {agent}, {stream}, {seq}, {epoch}, {topic.N}, {record.FIELD}, {file.name}, {file.sha256}, {file.id}, {file.size}, {file.meta.KEY}; any with a fallback: {record.FIELD | \"unknown\"})",
        ]
    );
    assert_eq!(
        problems("url = \"http://x\"\nbucket = \"b\"\norg = \"o\"\ncreate_database = true\nusername = \"u\"\n"),
        [
            "create_database: is for InfluxDB 1.x (`database`), not `bucket`",
            "username: is for InfluxDB 1.x (`database`), not `bucket`",
        ]
    );
    assert_eq!(
        problems("url = \"http://x\"\ndatabase = \"d\"\ntoken = { env = \"FLEETBUS_TEST_NEVER_SET_4711\" }\n"),
        [
            "token: is for InfluxDB 2.x (`bucket`), not `database`",
            "token: environment variable FLEETBUS_TEST_NEVER_SET_4711 is not set",
        ]
    );
}

#[test]
fn the_write_url_keeps_a_path_prefix_and_names_database_or_bucket() {
    let url = |text: &str| {
        toml::from_str::<InfluxSinkConfig>(text)
            .unwrap()
            .write_url()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        url("url = \"http://h:8086\"\ndatabase = \"fleet\"\nretention_policy = \"30d\"\n"),
        "http://h:8086/write?db=fleet&precision=ns&rp=30d"
    );
    assert_eq!(
        url("url = \"https://h/influx/\"\norg = \"ops\"\nbucket = \"fleet metrics\"\n"),
        "https://h/influx/api/v2/write?org=ops&bucket=fleet+metrics&precision=ns"
    );
}

#[tokio::test]
async fn each_message_without_points_goes_with_its_own_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config: InfluxSinkConfig =
        toml::from_str("url = \"http://127.0.0.1:9\"\ndatabase = \"d\"\n").unwrap();
    let mut sink = config
        .build(&SinkPlace::in_dir("influx", dir.path()))
        .unwrap();
    let items = vec![
        item(
            "fleet/a/telemetry/metrics",
            r#"{"seq":1,"metrics":[{"name":"a","value":"high"}]}"#,
        ),
        item("fleet/a/telemetry/heartbeat", r#"{"seq":2}"#),
        item(
            "fleet/a/telemetry/metrics",
            r#"{"seq":3,"metrics":[{"name":"a","value":"low"}]}"#,
        ),
    ];
    let batch = Batch {
        first: 1,
        next: 4,
        items,
    };
    let e = sink.write(&batch).await.unwrap_err();
    assert_eq!(e.rejected_items(), Some(&[0, 2][..]), "{e}");
    assert_eq!(e.to_string(), "metric 0 (`a`) has no numeric `value`");
    let rest = Batch {
        first: 2,
        next: 3,
        items: vec![batch.items[1].clone()],
    };
    let e = sink.write(&rest).await.unwrap_err();
    assert_eq!(e.rejected_items(), Some(&[0][..]), "{e}");
    assert!(e.to_string().contains("only metric records"), "{e}");
}
