//! Input images as requests carry them: the size read from the header at admission
//! (`frisket_proto::limits`), the pixels decoded within limits when the job is about to run. Depends on the `image` crate alone, so the
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
    /// `bytes` with the size its header declares (`frisket_proto::limits::Limits::
    /// reference_size` / `mask_size` read it and check it against the limits).
    pub fn new(bytes: &[u8], (width, height): (u32, u32)) -> Self {
        Self { bytes: bytes.to_vec(), width, height }
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
