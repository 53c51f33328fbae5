use super::*;

#[test]
fn the_role_comes_from_a_fleetbus_role_line_of_the_user_data() {
    for (text, role) in [
        ("FLEETBUS_ROLE=web", Some("web")),
        ("#!/bin/bash\n  export FLEETBUS_ROLE='db'\n", Some("db")),
        ("X=1\nFLEETBUS_ROLE=\"\"\n", None),
        ("MY_FLEETBUS_ROLE=x", None),
        ("", None),
    ] {
        assert_eq!(role_in_user_data(text).as_deref(), role, "{text:?}");
    }
}
