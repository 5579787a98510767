//! Scraping a server's Prometheus metrics (`serve --metrics-listen`).
use crate::Server;
use std::collections::BTreeMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample of the text exposition: metric name, labels, value.
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: String) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}').expect("labels end with }")),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').expect("label=value");
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            samples.push(Sample { name: name.to_string(), labels, value });
        }
        Scrape { text, samples }
    }

    /// The sum of `name`'s samples whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .sum()
    }
}

/// GET /metrics over HTTP/1.1.
pub async fn scrape(url: &str) -> Scrape {
    let authority = url.strip_prefix("http://").and_then(|u| u.strip_suffix("/metrics")).expect("metrics URL");
    let mut tcp = tokio::net::TcpStream::connect(authority).await.expect("connecting to the metrics port");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await.unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "metrics answered {head}");
    assert!(head.to_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    Scrape::parse(body.to_string())
}

/// The /metrics URL a server started with `--metrics-listen` printed.
pub fn metrics_url(server: &Server) -> String {
    server
        .logs()
        .lines()
        .find_map(|l| l.strip_prefix("[stdout] frisket-server metrics on "))
        .expect("the server prints its metrics address")
        .trim()
        .to_string()
}
