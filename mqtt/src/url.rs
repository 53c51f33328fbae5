//! Broker URLs: `mqtt://host:port` (or `tcp://`, port 1883 by default), `mqtts://`
//! (TLS, 8883), `ws://host:port/path` (MQTT over WebSocket, 80, path `/mqtt`) and
//! `wss://` (WebSocket over TLS, 443: the one outbound port most networks allow).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// How a client reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// MQTT over TCP.
    Mqtt,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl Scheme {
    /// The scheme's name in URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Mqtt => "mqtt",
            Scheme::Mqtts => "mqtts",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        }
    }

    /// Its port when the URL names none.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Mqtt => 1883,
            Scheme::Mqtts => 8883,
            Scheme::Ws => 80,
            Scheme::Wss => 443,
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Mqtts | Scheme::Wss)
    }

    /// Whether MQTT travels inside WebSocket frames.
    pub fn is_websocket(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }
}

/// Where a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// How.
    pub scheme: Scheme,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The HTTP path of a WebSocket URL (`/mqtt` when the URL names none); empty otherwise.
    pub path: String,
}

impl BrokerUrl {
    /// `mqtt://host:port`.
    pub fn mqtt(host: impl Into<String>, port: u16) -> BrokerUrl {
        BrokerUrl {
            scheme: Scheme::Mqtt,
            host: host.into(),
            port,
            path: String::new(),
        }
    }

    /// The host as it stands in a URL (IPv6 in brackets).
    fn host_in_url(&self) -> String {
        match self.host.contains(':') {
            true => format!("[{}]", self.host),
            false => self.host.clone(),
        }
    }
}

/// Why a broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The scheme is not one this build speaks.
    #[error(
        "broker URL `{url}`: unsupported scheme `{scheme}` (mqtt://, tcp://, mqtts://, ws:// and wss:// are)"
    )]
    Scheme {
        /// The whole URL.
        url: String,
        /// The scheme found.
        scheme: String,
    },
    /// The URL has no `scheme://`, no host, or a bad port.
    #[error("broker URL `{url}`: {problem} (expected e.g. mqtt://host:1883 or wss://host/mqtt)")]
    Malformed {
        /// The whole URL.
        url: String,
        /// What is wrong.
        problem: &'static str,
    },
}

impl FromStr for BrokerUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let malformed = |problem| UrlError::Malformed {
            url: url.to_string(),
            problem,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| malformed("no scheme"))?;
        let scheme = match scheme {
            "mqtt" | "tcp" => Scheme::Mqtt,
            "mqtts" | "ssl" => Scheme::Mqtts,
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            other => {
                return Err(UrlError::Scheme {
                    url: url.to_string(),
                    scheme: other.to_string(),
                })
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(malformed(
                "user info is not supported (use connection.token_file)",
            ));
        }
        let path = match (scheme.is_websocket(), path) {
            (true, "" | "/") => "/mqtt".to_string(),
            (true, p) => p.to_string(),
            (false, "" | "/") => String::new(),
            (false, _) => return Err(malformed("a path is only meaningful for ws:// and wss://")),
        };
        let default_port = scheme.default_port();
        let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
            // [ipv6]:port
            let (host, after) = stripped
                .split_once(']')
                .ok_or_else(|| malformed("unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| malformed("bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(malformed("junk after ]")),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| malformed("bad port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(malformed("no host"));
        }
        Ok(BrokerUrl {
            scheme,
            host,
            port,
            path,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}:{}{}",
            self.scheme.as_str(),
            self.host_in_url(),
            self.port,
            self.path
        )
    }
}

impl<'de> Deserialize<'de> for BrokerUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for BrokerUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_and_port() {
        let u: BrokerUrl = "mqtt://example.org:1884".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("example.org", 1884));
        let u: BrokerUrl = "tcp://10.0.0.1".parse().unwrap();
        assert_eq!(u.port, 1883);
        let u: BrokerUrl = "mqtt://[::1]:9".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(u.to_string(), "mqtt://[::1]:9");
    }

    #[test]
    fn tls_and_websocket_urls() {
        let u: BrokerUrl = "wss://fleet.example.org".parse().unwrap();
        assert_eq!(
            (u.scheme, u.port, u.path.as_str()),
            (Scheme::Wss, 443, "/mqtt")
        );
        assert_eq!(u.to_string(), "wss://fleet.example.org:443/mqtt");
        let u: BrokerUrl = "ws://h:8080/custom/path".parse().unwrap();
        assert_eq!((u.port, u.path.as_str()), (8080, "/custom/path"));
        let u: BrokerUrl = "mqtts://h".parse().unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Mqtts, 8883));
        assert_eq!(u.to_string().parse::<BrokerUrl>().unwrap(), u);
    }

    #[test]
    fn refuses_what_it_cannot_speak() {
        assert!(matches!(
            "http://h:443".parse::<BrokerUrl>(),
            Err(UrlError::Scheme { .. })
        ));
        assert!("h:1883".parse::<BrokerUrl>().is_err());
        assert!("mqtt://h:notaport".parse::<BrokerUrl>().is_err());
        assert!("mqtt://:1".parse::<BrokerUrl>().is_err());
        assert!("mqtt://h:1/path".parse::<BrokerUrl>().is_err());
        assert!("mqtt://user@h:1".parse::<BrokerUrl>().is_err());
    }
}
