//! Generated gRPC types and stubs for Frisket's API (`proto/frisket/v1/frisket.proto`).
pub mod codec;

pub mod v1 {
    tonic::include_proto!("frisket.v1");
}

/// The encoded descriptors of the API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("frisket_descriptor");

/// A LoRA as command lines name it, `NAME` or `NAME:WEIGHT` (weight 1 when absent), as the
/// proto's `LoraSpec`.
pub fn parse_lora_spec(spec: &str) -> Result<v1::LoraSpec, String> {
    let (name, weight) = match spec.rsplit_once(':') {
        Some((name, w)) => {
            let w: f32 = w.trim().parse().map_err(|_| format!("LoRA {spec:?}: weight {w:?} is not a number"))?;
            (name, Some(w))
        }
        None => (spec, None),
    };
    if name.trim().is_empty() {
        return Err(format!("LoRA {spec:?}: expected NAME or NAME:WEIGHT"));
    }
    Ok(v1::LoraSpec { name: name.trim().to_string(), weight })
}

#[cfg(test)]
mod tests {
    use super::parse_lora_spec;

    #[test]
    fn lora_specs() {
        let s = parse_lora_spec("detail:0.6").unwrap();
        assert_eq!((s.name.as_str(), s.weight), ("detail", Some(0.6)));
        let s = parse_lora_spec("style").unwrap();
        assert_eq!((s.name.as_str(), s.weight), ("style", None));
        assert_eq!(parse_lora_spec("neg:-1.5").unwrap().weight, Some(-1.5));
        assert!(parse_lora_spec("x:strong").is_err());
        assert!(parse_lora_spec(":1").is_err());
    }
}
