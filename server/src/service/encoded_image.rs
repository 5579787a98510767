//! Input images as requests carry them: the header read at admission, the pixels decoded
//! within limits when the job is about to run. Depends on the `image` crate alone, so the
//! fuzz targets (`fuzz/`) compile this file as it is, without libtorch.

/// An input image as the request carried it: its encoded bytes and the size its header
/// declares, checked against the limits before the job is queued. A waiting job holds only
/// these bytes; the pixels are decoded when the job is about to run (`JobSpec::params`).
#[derive(Clone, Debug)]
pub struct EncodedImage {
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// Most bytes one image may decode into (a small file must not expand into gigabytes).
pub const MAX_DECODED_BYTES: u64 = 1 << 30;

impl EncodedImage {
    /// Reads the header of PNG or JPEG `bytes` (format and size), without the pixels.
    pub fn read(bytes: &[u8], max_side: u32) -> Result<Self, String> {
        let reader =
            image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
        if !matches!(reader.format(), Some(image::ImageFormat::Png | image::ImageFormat::Jpeg)) {
            return Err("not a PNG or JPEG image".to_string());
        }
        let (width, height) = reader.into_dimensions().map_err(|e| e.to_string())?;
        if width == 0 || height == 0 {
            return Err(format!("it is {width}×{height} pixels"));
        }
        if width > max_side || height > max_side {
            return Err(format!("{width}×{height} is larger than {max_side}×{max_side} pixels"));
        }
        Ok(Self { bytes: bytes.to_vec(), width, height })
    }

    /// The pixels, decoded within the size the header declared and `MAX_DECODED_BYTES`.
    /// Same pixels as `image_io::decode_rgb`.
    pub fn decode(&self) -> Result<image::DynamicImage, String> {
        let mut reader = image::ImageReader::new(std::io::Cursor::new(&self.bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(self.width);
        limits.max_image_height = Some(self.height);
        limits.max_alloc = Some(MAX_DECODED_BYTES);
        reader.limits(limits);
        reader.decode().map_err(|e| match e {
            image::ImageError::Limits(_) => format!("it decodes to more than {} MiB", MAX_DECODED_BYTES >> 20),
            other => other.to_string(),
        })
    }
}
