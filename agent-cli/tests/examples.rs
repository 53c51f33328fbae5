//! The example agent configuration in `examples/` is one the agent accepts as it is (a
//! stale example is a bug).

#[test]
fn the_example_agent_configuration_loads_and_passes_its_checks() {
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/agent.toml"
    ));
    let config = match fleetbus_agent_cli::load_config(Some(path)) {
        Ok(c) => c.into_inner(),
        Err(e) => panic!("examples/agent.toml: {e:#}"),
    };
    assert!(config.checks.contains_key("root-disk"));
    assert!(config.checks["backup"].is_passive());
}
