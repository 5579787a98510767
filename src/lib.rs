//! Generated gRPC types and stubs for Frisket's API (`proto/frisket/v1/frisket.proto`).
pub mod codec;
pub mod defaults;
pub mod limits;
pub mod text;

pub mod v1 {
    tonic::include_proto!("frisket.v1");
}

/// The encoded descriptors of the API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("frisket_descriptor");

/// The trailer of a Generate stream that ends with a status other than OK, counting the
/// events a newer one of the same kind replaced while the client was behind (the
/// `Result.dropped_events` of a stream that ends with its Result); absent when 0.
pub const DROPPED_EVENTS_TRAILER: &str = "frisket-dropped-events";

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

/// `WIDTHxHEIGHT` of command lines (`--original-size 2048x1536`).
pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let parsed = s.split_once(['x', 'X']).and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    parsed.ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT in pixels, e.g. 2048x1536"))
}

/// `TOP,LEFT` of command lines (`--crop-top-left 0,256`).
pub fn parse_top_left(s: &str) -> Result<(u32, u32), String> {
    let parsed = s.split_once(',').and_then(|(t, l)| Some((t.trim().parse().ok()?, l.trim().parse().ok()?)));
    parsed.ok_or_else(|| format!("{s:?}: expected TOP,LEFT in pixels, e.g. 0,256"))
}

/// The request's SDXL size conditioning from the command lines' `--original-size` and
/// `--crop-top-left`; None when neither is given.
pub fn size_conditioning(
    original: Option<(u32, u32)>,
    crop_top_left: Option<(u32, u32)>,
) -> Option<v1::SizeConditioning> {
    if original.is_none() && crop_top_left.is_none() {
        return None;
    }
    let (original_width, original_height) = original.unwrap_or((0, 0));
    let (crop_top, crop_left) = crop_top_left.unwrap_or((0, 0));
    Some(v1::SizeConditioning { original_width, original_height, crop_top, crop_left })
}

#[cfg(test)]
mod tests {
    use super::{parse_lora_spec, parse_size, parse_top_left};

    #[test]
    fn sizes_and_corners() {
        assert_eq!(parse_size("2048x1536"), Ok((2048, 1536)));
        assert!(parse_size("2048").is_err() && parse_size("ax1").is_err());
        assert_eq!(parse_top_left("0, 256"), Ok((0, 256)));
        assert!(parse_top_left("0x256").is_err());
    }

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
