//! What both targets share: the server's input-image code, compiled from its source file
//! (it depends on the `image` crate alone; the rest of the server links libtorch), after
//! frisket-proto's header check.
#[allow(dead_code)]
#[path = "../../server/src/service/encoded_image.rs"]
pub mod encoded_image;

/// The longest image side the targets accept: big enough for every decoder path, small
/// enough that a declared size costs little per execution (a server's is `--max-side`).
pub const MAX_SIDE: u32 = 1024;

/// What the server does with an input image: the header read at admission, then the decode
/// within the limits when the job runs. A decoded image has the size its header declared.
pub fn load(bytes: &[u8]) {
    let limits = frisket_proto::limits::Limits { max_side: MAX_SIDE, ..Default::default() };
    if let Ok(size) = limits.reference_size(bytes) {
        let header = encoded_image::EncodedImage::new(bytes, size);
        assert!(header.width <= MAX_SIDE && header.height <= MAX_SIDE);
        if let Ok(pixels) = header.decode() {
            assert_eq!((pixels.width(), pixels.height()), (header.width, header.height));
        }
    }
}
