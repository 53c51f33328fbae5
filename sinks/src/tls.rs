//! The TLS client settings of the sinks that reach a server themselves (HTTP, PostgreSQL):
//! rustls with fleetbus's crypto provider, the server's certificate checked against the
//! operator's CA file or else the system's CAs.

use std::path::Path;

/// rustls with fleetbus's crypto provider, trusting `ca_file` or else the system's CAs.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    fleetbus_mqtt::https_client_config("ca_file", ca_file)
}

/// Records a problem at `ca_file` when the file cannot be read as PEM certificates.
pub fn check_ca_file(ca_file: Option<&Path>, p: &mut fleetbus_config::Problems) {
    if let Some(ca) = ca_file {
        if let Err(e) = fleetbus_mqtt::read_certificates("ca_file", ca) {
            p.add("ca_file", e.to_string());
        }
    }
}
