//! Raw tensors streamed by the server (latents, masks, heatmaps) and the NumPy `.npy`
//! format they are dumped in.
use crate::{proto, Error};

/// Element type of a streamed tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
}

impl DType {
    /// Parses the proto's dtype string ("float32" or "float16").
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" | "f32" | "float" => Some(DType::F32),
            "float16" | "f16" | "half" => Some(DType::F16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }

    /// The proto's name for it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
        }
    }
}

/// A dense tensor: little-endian elements in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<u8>,
}

impl Tensor {
    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as f32 (float16 is widened exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => self.data.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        }
    }

    /// The tensor as a NumPy v1.0 `.npy` file of little-endian float32 (`<f4`).
    pub fn to_npy(&self) -> Vec<u8> {
        npy::encode_f32(&self.shape, &self.to_f32())
    }
}

impl TryFrom<proto::v1::Tensor> for Tensor {
    type Error = Error;

    fn try_from(t: proto::v1::Tensor) -> Result<Self, Error> {
        let dtype =
            DType::parse(&t.dtype).ok_or_else(|| Error::Protocol(format!("tensor has unknown dtype {:?}", t.dtype)))?;
        let mut shape = Vec::with_capacity(t.shape.len());
        for &d in &t.shape {
            let d = usize::try_from(d)
                .map_err(|_| Error::Protocol(format!("tensor has negative dimension in {:?}", t.shape)))?;
            shape.push(d);
        }
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let expected = numel.and_then(|n| n.checked_mul(dtype.size()));
        if expected != Some(t.data.len()) {
            return Err(Error::Protocol(format!(
                "tensor of shape {:?} ({}) carries {} bytes",
                t.shape,
                dtype.name(),
                t.data.len()
            )));
        }
        Ok(Tensor { shape, dtype, data: t.data })
    }
}

/// IEEE 754 half → single precision (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) & 1) as u32;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if mant == 0 {
            sign << 31
        } else {
            // Subnormal: normalise into an f32 normal.
            let mut e: u32 = 127 - 15 + 1;
            let mut m = mant;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            (sign << 31) | (e << 23) | ((m & 0x3ff) << 13)
        }
    } else if exp == 0x1f {
        (sign << 31) | 0x7f80_0000 | (mant << 13)
    } else {
        (sign << 31) | ((exp + 127 - 15) << 23) | (mant << 13)
    };
    f32::from_bits(bits)
}

/// The NumPy `.npy` format, version 1.0 (<https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html>).
pub mod npy {
    /// The file's magic string.
    pub const MAGIC: &[u8; 6] = b"\x93NUMPY";

    /// Encodes little-endian float32 values of the given C-order shape.
    ///
    /// The header is padded with spaces and ends in `\n` so that the data starts at a
    /// multiple of 64 bytes, as NumPy itself writes it.
    pub fn encode_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {}, }}", shape_tuple(shape));
        let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
        header.extend(std::iter::repeat_n(' ', (64 - unpadded % 64) % 64));
        header.push('\n');
        let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + values.len() * 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// A Python tuple literal: `()`, `(3,)`, `(1, 4, 12, 16)`.
    fn shape_tuple(shape: &[usize]) -> String {
        match shape {
            [] => "()".to_string(),
            [n] => format!("({n},)"),
            _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn header_is_aligned_and_parsable() {
            for shape in [vec![], vec![3], vec![1, 4, 12, 16]] {
                let n: usize = shape.iter().product();
                let bytes = encode_f32(&shape, &vec![1.5; n]);
                assert_eq!(&bytes[..6], MAGIC);
                assert_eq!(&bytes[6..8], &[1, 0]);
                let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
                assert_eq!((10 + hlen) % 64, 0);
                let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
                assert!(header.ends_with('\n'));
                assert!(header.contains("'descr': '<f4'"), "{header}");
                assert!(header.contains(&format!("'shape': {}", shape_tuple(&shape))), "{header}");
                assert_eq!(bytes.len(), 10 + hlen + 4 * n);
                if n > 0 {
                    assert_eq!(&bytes[10 + hlen..14 + hlen], &1.5f32.to_le_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_to_single() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0200), 2f32.powi(-15));
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn tensor_checks_its_size() {
        let ok = proto::v1::Tensor { shape: vec![1, 2], dtype: "float16".into(), data: vec![0, 0x3c, 0, 0xc0] };
        let t = Tensor::try_from(ok).unwrap();
        assert_eq!(t.to_f32(), vec![1.0, -2.0]);
        let short = proto::v1::Tensor { shape: vec![2, 2], dtype: "float32".into(), data: vec![0; 12] };
        assert!(Tensor::try_from(short).is_err());
        let bad = proto::v1::Tensor { shape: vec![1], dtype: "int8".into(), data: vec![0] };
        assert!(Tensor::try_from(bad).is_err());
    }
}
