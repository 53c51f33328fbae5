//! Broker URLs: `mqtt://host:port` (or `tcp://`); the port defaults to 1883.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// Where a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Why a broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The scheme is not one this build speaks.
    #[error(
        "broker URL `{url}`: unsupported scheme `{scheme}` (this build speaks mqtt:// and tcp://)"
    )]
    Scheme {
        /// The whole URL.
        url: String,
        /// The scheme found.
        scheme: String,
    },
    /// The URL has no `scheme://`, no host, or a bad port.
    #[error("broker URL `{url}`: {problem} (expected mqtt://host:port)")]
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
        if !matches!(scheme, "mqtt" | "tcp") {
            return Err(UrlError::Scheme {
                url: url.to_string(),
                scheme: scheme.to_string(),
            });
        }
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.contains('@') {
            return Err(malformed("paths and user info are not supported"));
        }
        let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
            // [ipv6]:port
            let (host, after) = stripped
                .split_once(']')
                .ok_or_else(|| malformed("unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| malformed("bad port"))?,
                None if after.is_empty() => 1883,
                None => return Err(malformed("junk after ]")),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| malformed("bad port"))?),
                None => (authority.to_string(), 1883),
            }
        };
        if host.is_empty() {
            return Err(malformed("no host"));
        }
        Ok(BrokerUrl { host, port })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "mqtt://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "mqtt://{}:{}", self.host, self.port)
        }
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
    fn refuses_what_it_cannot_speak() {
        assert!(matches!(
            "wss://h:443".parse::<BrokerUrl>(),
            Err(UrlError::Scheme { .. })
        ));
        assert!("h:1883".parse::<BrokerUrl>().is_err());
        assert!("mqtt://h:notaport".parse::<BrokerUrl>().is_err());
        assert!("mqtt://:1".parse::<BrokerUrl>().is_err());
    }
}
