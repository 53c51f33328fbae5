use super::*;

fn r(text: &str) -> Option<Range> {
    Some(Range::parse(text).unwrap())
}

fn d(label: &str, value: Option<f64>, unit: &str) -> PerfDatum {
    PerfDatum {
        label: label.into(),
        value,
        unit: unit.into(),
        warn: None,
        crit: None,
        min: None,
        max: None,
    }
}

/// The guidelines' example of long output: perfdata on the first line, after `|` on a
/// later one, and on every line after that.
#[test]
fn perfdata_on_the_first_line_and_on_later_lines_of_long_output_is_all_kept() {
    let out = parse(
        "DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968\n\
         / 15272 MB (77%);\n\
         /boot 68 MB (69%);\n\
         /home 69357 MB (27%); | /boot=68MB;88;93;0;98\n\
         /home=69357MB;253404;253409;0;253414\n\
         /var/log=819MB;970;975;0;980\n",
    );
    assert_eq!(out.text, "DISK OK - free space: / 3326 MB (56%);");
    assert_eq!(
        out.long_text,
        "/ 15272 MB (77%);\n/boot 68 MB (69%);\n/home 69357 MB (27%);"
    );
    let labels: Vec<&str> = out.perfdata.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(labels, ["/", "/boot", "/home", "/var/log"]);
    assert_eq!(
        out.perfdata[3],
        PerfDatum {
            warn: r("970"),
            crit: r("975"),
            min: Some(0.0),
            max: Some(980.0),
            ..d("/var/log", Some(819.0), "MB")
        }
    );
    assert!(out.problems.is_empty(), "{:?}", out.problems);
}

/// Tricky items, each with what it must read as.
#[test]
fn the_tricky_cases_read_as_the_guidelines_say() {
    let cases: Vec<(&str, PerfDatum)> = vec![
        ("'in use'=5", d("in use", Some(5.0), "")),
        ("'a=b'=1", d("a=b", Some(1.0), "")),
        ("'it''s'=2", d("it's", Some(2.0), "")),
        ("'''quoted'''=3", d("'quoted'", Some(3.0), "")),
        ("time=0.002s", d("time", Some(0.002), "s")),
        ("rta=1.5ms", d("rta", Some(1.5), "ms")),
        ("lat=250us", d("lat", Some(250.0), "us")),
        ("load=-0.5%", d("load", Some(-0.5), "%")),
        ("mem=12B", d("mem", Some(12.0), "B")),
        ("mem=12KB", d("mem", Some(12.0), "KB")),
        ("mem=12GB", d("mem", Some(12.0), "GB")),
        ("mem=1.2TB", d("mem", Some(1.2), "TB")),
        ("pkts=123456c", d("pkts", Some(123456.0), "c")),
        ("tiny=1e-3s", d("tiny", Some(0.001), "s")),
        ("watts=5W", d("watts", Some(5.0), "W")),
        ("x=U", d("x", None, "")),
        (
            "x=U;1;2",
            PerfDatum {
                warn: r("1"),
                crit: r("2"),
                ..d("x", None, "")
            },
        ),
        (
            "users=3;10:;~:20;0;",
            PerfDatum {
                warn: r("10:"),
                crit: r("~:20"),
                min: Some(0.0),
                ..d("users", Some(3.0), "")
            },
        ),
        (
            "temp=21;@10:20;;-40;125",
            PerfDatum {
                warn: r("@10:20"),
                min: Some(-40.0),
                max: Some(125.0),
                ..d("temp", Some(21.0), "")
            },
        ),
        ("a=1;;;;", d("a", Some(1.0), "")),
        (".5=.5", d(".5", Some(0.5), "")),
    ];
    for (text, want) in cases {
        let out = parse(&format!("OK | {text}"));
        assert_eq!(out.problems, Vec::<String>::new(), "{text}");
        assert_eq!(out.perfdata, [want], "{text}");
    }
}

/// A broken item is set apart with why; the items around it are kept.
#[test]
fn a_broken_item_is_named_and_the_others_kept() {
    let out = parse("WARN | a=1 b 'c=2 d=x e=1;2;zz f=1;20:10 g=3;1;2;3;4;5 'h'x=1 i=1,5 j=9");
    let labels: Vec<&str> = out.perfdata.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(labels, ["a", "j"], "{:#?}", out.problems);
    let expected = [
        "`b`: not label=value",
        "`'c=2 d=x e=1;2;zz f=1;20:10 g=3;1;2;3;4;5 'h'x=1`: no `=` after the quoted label",
        "`i=1,5`: `1,5` is not a number with a unit, nor U",
    ];
    assert_eq!(out.problems, expected);
    // unquoted, each on its own
    let out = parse("WARN | d=x e=1;2;zz f=1;20:10 g=3;1;2;3;4;5 'open=1");
    assert!(out.perfdata.is_empty());
    let said = out.problems.join("\n");
    for part in [
        "`d=x`: `x` is not a number",
        "`e=1;2;zz`: crit: `zz` is not a range",
        "`f=1;20:10`: warn: `20:10` is not a range (START is above END)",
        "`g=3;1;2;3;4;5`: more than value;warn;crit;min;max",
        "`'open=1`: the label's quote is not closed",
    ] {
        assert!(said.contains(part), "{part}\nin\n{said}");
    }
}

#[test]
fn output_without_perfdata_or_long_text_is_just_text() {
    let out = parse("PING OK - Packet loss = 0%\n");
    assert_eq!(out.text, "PING OK - Packet loss = 0%");
    assert_eq!(out.long_text, "");
    assert!(out.perfdata.is_empty() && out.problems.is_empty());
    assert_eq!(parse(""), PluginOutput::default());
    let out = parse("CRIT\nline one\n\nline three\n\n");
    assert_eq!(out.long_text, "line one\n\nline three");
}

mod generated {
    use super::*;
    use proptest::prelude::*;

    fn label() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_/ .='-]{1,12}".prop_filter("not only blanks", |l| !l.trim().is_empty())
    }

    fn value() -> impl Strategy<Value = f64> {
        (-1_000_000i64..1_000_000, 0u32..4)
            .prop_map(|(n, scale)| n as f64 / 10f64.powi(scale as i32))
    }

    fn range() -> impl Strategy<Value = Range> {
        (
            proptest::option::of(value()),
            proptest::option::of(value()),
            any::<bool>(),
        )
            .prop_map(|(a, b, inside)| {
                let (start, end) = match (a, b) {
                    (Some(a), Some(b)) if a > b => (Some(b), Some(a)),
                    other => other,
                };
                Range { start, end, inside }
            })
    }

    fn datum() -> impl Strategy<Value = PerfDatum> {
        (
            label(),
            proptest::option::of(value()),
            proptest::sample::select(KNOWN_UNITS.to_vec()),
            proptest::option::of(range()),
            proptest::option::of(range()),
            proptest::option::of(value()),
            proptest::option::of(value()),
        )
            .prop_map(|(label, value, unit, warn, crit, min, max)| PerfDatum {
                label,
                unit: if value.is_some() {
                    unit.to_string()
                } else {
                    String::new()
                },
                value,
                warn,
                crit,
                min,
                max,
            })
    }

    /// An item as a plugin would print it: the label quoted (with `''`) when it needs
    /// to be, trailing empty fields left out.
    fn print(d: &PerfDatum) -> String {
        let label = match d.label.contains([' ', '=', '\'']) {
            true => format!("'{}'", d.label.replace('\'', "''")),
            false => d.label.clone(),
        };
        let value = match d.value {
            Some(v) => format!("{v}{}", d.unit),
            None => "U".into(),
        };
        let mut fields = vec![
            value,
            d.warn.map(|r| r.to_string()).unwrap_or_default(),
            d.crit.map(|r| r.to_string()).unwrap_or_default(),
            d.min.map(|v| v.to_string()).unwrap_or_default(),
            d.max.map(|v| v.to_string()).unwrap_or_default(),
        ];
        while fields.len() > 1 && fields.last().is_some_and(String::is_empty) {
            fields.pop();
        }
        format!("{label}={}", fields.join(";"))
    }

    proptest! {
        /// Whatever a plugin prints by the rules reads back as what it meant, spread
        /// over the first line and later lines of long output alike.
        #[test]
        fn printed_items_read_back_the_same(items in proptest::collection::vec(datum(), 0..8), split in 0usize..8) {
            let printed: Vec<String> = items.iter().map(print).collect();
            let at = split.min(printed.len());
            let output = format!(
                "STATUS text | {}\nlong line\nanother | {}\n",
                printed[..at].join(" "),
                printed[at..].join("\n")
            );
            let out = parse(&output);
            prop_assert_eq!(out.problems, Vec::<String>::new());
            prop_assert_eq!(out.perfdata, items);
            prop_assert_eq!(out.long_text, "long line\nanother");
        }

        /// No input makes the parser panic, and every item is either read or named.
        #[test]
        fn any_text_is_read_without_panic(text in "\\PC{0,200}") {
            let out = parse(&text);
            for p in &out.problems {
                prop_assert!(p.starts_with('`'));
            }
        }
    }
}
